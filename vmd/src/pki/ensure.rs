//! Idempotent creation and renewal of the whole PKI; see the module docs of
//! [`super`] for the steps.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::names::ResolvedServerNames;
use super::summary::parse_x509;
use super::{
    CertSummary, CertificateAuthority, ClientName, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS,
    DEFAULT_RENEW_BEFORE_DAYS, IssuedCert, KeyPairPem, PkiError, PkiLayout, ServerNames, Validity,
    store,
};

/// What [`ensure`] should make exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnsureSpec {
    /// Common name of the CA, used only when a CA is created.
    pub ca_common_name: String,
    /// The server certificate's names, or `None` for no server certificate.
    pub server: Option<ServerNames>,
    /// Client certificates to create.
    pub clients: Vec<ClientName>,
    /// Validity of newly issued leaf certificates, in days.
    pub leaf_days: u32,
    /// Validity of a newly created CA, in days.
    pub ca_days: u32,
    /// Leaf certificates with fewer days left are renewed.
    pub renew_before_days: u32,
}

impl EnsureSpec {
    /// A development PKI: CA "vmd development CA", a server certificate for
    /// `vmd`, `localhost`, `127.0.0.1` and `::1`, and one client
    /// `dev-admin`, with the default validities.
    pub fn dev() -> Self {
        Self {
            ca_common_name: "vmd development CA".to_owned(),
            server: Some(ServerNames::dev()),
            clients: vec![
                "dev-admin"
                    .parse()
                    .expect("\"dev-admin\" is a valid client name"),
            ],
            leaf_days: DEFAULT_LEAF_DAYS,
            ca_days: DEFAULT_CA_DAYS,
            renew_before_days: DEFAULT_RENEW_BEFORE_DAYS,
        }
    }
}

/// What [`ensure`] did, file by file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnsureReport {
    /// Files that did not exist and were written.
    pub created: Vec<PathBuf>,
    /// Certificate files that existed and were re-issued.
    pub renewed: Vec<PathBuf>,
    /// Files that were left as they were.
    pub unchanged: Vec<PathBuf>,
}

impl EnsureReport {
    /// Whether nothing was written.
    pub fn is_unchanged(&self) -> bool {
        self.created.is_empty() && self.renewed.is_empty()
    }
}

impl fmt::Display for EnsureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = [
            ("created", &self.created),
            ("renewed", &self.renewed),
            ("unchanged", &self.unchanged),
        ];
        let mut first = true;
        for (label, paths) in groups {
            for path in paths {
                if !first {
                    writeln!(f)?;
                }
                first = false;
                write!(f, "{label:<10}{}", path.display())?;
            }
        }
        Ok(())
    }
}

/// Makes the PKI in `layout` match `spec`, creating what is missing and
/// renewing what is stale. Idempotent: a second run with the same spec
/// writes nothing.
///
/// A certificate is re-issued when it is missing, unparsable, expired,
/// expiring within `renew_before_days`, not for its key, not signed by the
/// CA, or lacking a requested SAN; always for the existing key when there
/// is one. A key file is never overwritten or deleted, and the CA key is
/// never rewritten once created. The CA itself is not rotated: when it
/// expires within `renew_before_days` a warning is logged.
///
/// Everything is checked and signed in memory before the first file is
/// written, so any error other than a failed write leaves the directory
/// untouched.
///
/// # Errors
///
/// Any [`PkiError`]: an unparsable key or CA file, a CA certificate without
/// its key, a key that does not match the CA certificate, an invalid server
/// name, or an I/O failure. Errors name the file involved.
pub fn ensure(layout: &PkiLayout, spec: &EnsureSpec) -> Result<EnsureReport, PkiError> {
    let now = OffsetDateTime::now_utc();
    if spec.renew_before_days >= spec.leaf_days {
        tracing::warn!(
            leaf_days = spec.leaf_days,
            renew_before_days = spec.renew_before_days,
            "renew_before_days is not below leaf_days: certificates are renewed on every run"
        );
    }
    let mut plan = Plan::default();
    let ca = plan_ca(layout, spec, now, &mut plan)?;
    let leaf_validity = Validity::days_from_now(spec.leaf_days);

    if let Some(names) = &spec.server {
        let names = names.resolve()?;
        plan_leaf(
            &ca,
            &Leaf::Server(&names),
            &layout.server_cert(),
            &layout.server_key(),
            leaf_validity,
            spec.renew_before_days,
            now,
            &mut plan,
        )?;
    }
    let mut seen = BTreeSet::new();
    for client in &spec.clients {
        if !seen.insert(client) {
            continue;
        }
        plan_leaf(
            &ca,
            &Leaf::Client(client),
            &layout.client_cert(client),
            &layout.client_key(client),
            leaf_validity,
            spec.renew_before_days,
            now,
            &mut plan,
        )?;
    }
    plan.apply(layout)
}

/// The files to write, decided before anything is written.
#[derive(Debug, Default)]
struct Plan {
    writes: Vec<PlannedWrite>,
    unchanged: Vec<PathBuf>,
}

#[derive(Debug)]
enum PlannedWrite {
    NewKey {
        path: PathBuf,
        pem: String,
    },
    Cert {
        path: PathBuf,
        pem: String,
        existed: bool,
    },
}

impl Plan {
    fn apply(self, layout: &PkiLayout) -> Result<EnsureReport, PkiError> {
        let mut report = EnsureReport {
            unchanged: self.unchanged,
            ..EnsureReport::default()
        };
        if !self.writes.is_empty() {
            store::create_private_dir(layout.dir())?;
        }
        for write in self.writes {
            match write {
                PlannedWrite::NewKey { path, pem } => {
                    store::write_new_key(&path, &pem)?;
                    tracing::info!(path = %path.display(), "created key");
                    report.created.push(path);
                }
                PlannedWrite::Cert { path, pem, existed } => {
                    store::write_cert(&path, &pem)?;
                    if existed {
                        tracing::info!(path = %path.display(), "renewed certificate");
                        report.renewed.push(path);
                    } else {
                        tracing::info!(path = %path.display(), "created certificate");
                        report.created.push(path);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Plans the writes for a certificate issued for a key that either
    /// existed already (`key_existed`) or was generated with it.
    fn issued(
        &mut self,
        issued: IssuedCert,
        cert_path: &Path,
        cert_existed: bool,
        key_path: &Path,
        key_existed: bool,
    ) {
        if key_existed {
            self.unchanged.push(key_path.to_owned());
        } else {
            self.writes.push(PlannedWrite::NewKey {
                path: key_path.to_owned(),
                pem: issued.key_pem,
            });
        }
        self.writes.push(PlannedWrite::Cert {
            path: cert_path.to_owned(),
            pem: issued.cert_pem,
            existed: cert_existed,
        });
    }
}

/// Step 1: load, create, or complete the CA.
fn plan_ca(
    layout: &PkiLayout,
    spec: &EnsureSpec,
    now: OffsetDateTime,
    plan: &mut Plan,
) -> Result<CertificateAuthority, PkiError> {
    let cert_path = layout.ca_cert();
    let key_path = layout.ca_key();
    let key = store::read_optional_key(&key_path)?;
    let cert = store::read_optional(&cert_path)?;
    let validity = Validity::days_from_now(spec.ca_days);
    match (cert, key) {
        (None, None) => {
            let ca = CertificateAuthority::generate(&spec.ca_common_name, validity)?;
            let issued = IssuedCert {
                cert_pem: ca.cert_pem(),
                key_pem: ca.key_pem().to_owned(),
            };
            plan.issued(issued, &cert_path, false, &key_path, false);
            Ok(ca)
        }
        (Some(_), None) => Err(PkiError::CaKeyMissing {
            cert: cert_path,
            key: key_path,
        }),
        (None, Some(key)) => {
            tracing::warn!(
                cert = %cert_path.display(),
                key = %key_path.display(),
                "CA certificate missing; re-creating it from the existing CA key"
            );
            let ca = CertificateAuthority::self_signed(&spec.ca_common_name, validity, key)?;
            plan.unchanged.push(key_path);
            plan.writes.push(PlannedWrite::Cert {
                path: cert_path,
                pem: ca.cert_pem(),
                existed: false,
            });
            Ok(ca)
        }
        (Some(bytes), Some(key)) => {
            let der = store::parse_cert_pem(&bytes, &cert_path)?;
            let ca = CertificateAuthority::from_parts(der, key, &cert_path, &key_path)?;
            let not_after = ca.summary().not_after;
            if not_after <= now {
                tracing::warn!(
                    path = %cert_path.display(),
                    %not_after,
                    "CA certificate has expired; create a new CA and redistribute it"
                );
            } else if ca.summary().expires_within_at(spec.renew_before_days, now) {
                tracing::warn!(
                    path = %cert_path.display(),
                    %not_after,
                    "CA certificate expires soon; create a new CA and redistribute it"
                );
            }
            plan.unchanged.push(cert_path);
            plan.unchanged.push(key_path);
            Ok(ca)
        }
    }
}

/// A leaf certificate to ensure.
#[derive(Debug)]
enum Leaf<'a> {
    Server(&'a ResolvedServerNames),
    Client(&'a ClientName),
}

impl Leaf<'_> {
    fn dns_names(&self) -> Vec<&str> {
        match self {
            Leaf::Server(names) => names.dns.iter().map(String::as_str).collect(),
            Leaf::Client(name) => vec![name.as_str()],
        }
    }

    fn ips(&self) -> &[IpAddr] {
        match self {
            Leaf::Server(names) => &names.ips,
            Leaf::Client(_) => &[],
        }
    }

    fn issue(
        &self,
        ca: &CertificateAuthority,
        validity: Validity,
        key: Option<&KeyPairPem>,
    ) -> Result<IssuedCert, PkiError> {
        match self {
            Leaf::Server(names) => ca.issue_server_resolved(names, validity, key),
            Leaf::Client(name) => ca.issue_client(name, validity, key),
        }
    }
}

/// Steps 2 and 3 for one leaf: read its key, check its certificate, and
/// plan a re-issue if needed.
#[allow(clippy::too_many_arguments)]
fn plan_leaf(
    ca: &CertificateAuthority,
    leaf: &Leaf<'_>,
    cert_path: &Path,
    key_path: &Path,
    validity: Validity,
    renew_before_days: u32,
    now: OffsetDateTime,
    plan: &mut Plan,
) -> Result<(), PkiError> {
    let key = store::read_optional_key(key_path)?;
    let cert = store::read_optional(cert_path)?;
    let reason = match (&key, &cert) {
        (None, _) => Some("no key".to_owned()),
        (Some(_), None) => Some("no certificate".to_owned()),
        (Some(key), Some(bytes)) => cert_problem(ca, leaf, key, bytes, renew_before_days, now),
    };
    let Some(reason) = reason else {
        plan.unchanged.push(cert_path.to_owned());
        plan.unchanged.push(key_path.to_owned());
        return Ok(());
    };
    if cert.is_some() {
        tracing::info!(path = %cert_path.display(), %reason, "re-issuing certificate");
    }
    let issued = leaf.issue(ca, validity, key.as_ref())?;
    plan.issued(issued, cert_path, cert.is_some(), key_path, key.is_some());
    Ok(())
}

/// Why an existing certificate must be re-issued, or `None` if it is fine.
fn cert_problem(
    ca: &CertificateAuthority,
    leaf: &Leaf<'_>,
    key: &KeyPairPem,
    pem: &[u8],
    renew_before_days: u32,
    now: OffsetDateTime,
) -> Option<String> {
    let Ok(der) = store::parse_cert_pem(pem, Path::new("")) else {
        return Some("certificate is not valid PEM".to_owned());
    };
    let Ok(x509) = parse_x509(&der) else {
        return Some("certificate is not valid X.509".to_owned());
    };
    let summary = CertSummary::from_x509(&x509);
    if summary.spki_sha256 != key.spki_sha256() {
        return Some("certificate is for a different key".to_owned());
    }
    if !ca.signed(&x509) {
        return Some("certificate is not signed by the CA".to_owned());
    }
    if summary.is_ca {
        return Some("certificate is a CA certificate".to_owned());
    }
    if super::ca::encodes_default_basic_constraints(&x509) {
        return Some(
            "certificate is not strict DER (explicit BasicConstraints cA FALSE)".to_owned(),
        );
    }
    if summary.not_before > now {
        return Some(format!(
            "certificate is not valid before {}",
            summary.not_before
        ));
    }
    if summary.expires_within_at(renew_before_days, now) {
        return Some(format!("certificate expires at {}", summary.not_after));
    }
    let eku_ok = match x509.extended_key_usage() {
        Ok(Some(eku)) => match leaf {
            Leaf::Server(_) => eku.value.server_auth,
            Leaf::Client(_) => eku.value.client_auth,
        },
        _ => false,
    };
    if !eku_ok {
        return Some("certificate lacks the required extended key usage".to_owned());
    }
    for dns in leaf.dns_names() {
        if !summary
            .dns_names
            .iter()
            .any(|have| have.eq_ignore_ascii_case(dns))
        {
            return Some(format!("certificate lacks DNS name {dns}"));
        }
    }
    for ip in leaf.ips() {
        if !summary.ip_addresses.contains(ip) {
            return Some(format!("certificate lacks IP address {ip}"));
        }
    }
    None
}
