//! The `vmd pki ...` subcommands.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{
    CertSummary, CertificateAuthority, ClientName, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS,
    DEFAULT_RENEW_BEFORE_DAYS, EnsureSpec, IssuedCert, KeyPairPem, PkiError, PkiLayout,
    ServerNames, Validity, ensure, store,
};

/// `vmd pki` subcommands.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum PkiCommand {
    /// Create a CA in --dir if none exists.
    Init {
        /// PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "vmd CA")]
        name: String,
        /// Validity of the CA in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue (or renew) the server certificate, keeping an existing key.
    IssueServer {
        /// PKI directory (must contain a CA).
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name for the certificate ("vmd" is always included).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// IP address for the certificate.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Issue (or renew) a client certificate, keeping an existing key.
    IssueClient {
        /// PKI directory (must contain a CA).
        #[arg(long)]
        dir: PathBuf,
        /// Client name: a DNS label of [a-z0-9-].
        name: ClientName,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Create whatever is missing: CA, server cert, client certs. Idempotent.
    Ensure {
        /// PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// Common name of the CA if one is created.
        #[arg(long, default_value = "vmd CA")]
        ca_name: String,
        /// Extra DNS name for the server certificate ("vmd" is always included).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// IP address for the server certificate.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Do not create a server certificate.
        #[arg(long, conflicts_with_all = ["dns", "ips"])]
        no_server: bool,
        /// Client certificate to create (repeatable).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<ClientName>,
        /// Validity of new leaf certificates in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Validity of a new CA in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        ca_days: u32,
        /// Renew leaf certificates with fewer days left than this.
        #[arg(long, default_value_t = DEFAULT_RENEW_BEFORE_DAYS)]
        renew_before_days: u32,
    },
    /// Show a certificate file, or every certificate in a PKI directory.
    Show {
        /// Certificate file or PKI directory.
        path: PathBuf,
    },
    /// Revoke a client certificate: add it to `<dir>/crl.pem`. The daemon
    /// honours it when `[tls] crls` lists the file, after a reload (SIGHUP).
    Revoke {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The client whose certificate (`clients/NAME.pem`) is revoked.
        name: ClientName,
    },
}

/// Runs a pki subcommand, printing a short human report to stdout.
///
/// # Errors
///
/// Any [`PkiError`] from the operation; `issue-server` and `issue-client`
/// fail with [`PkiError::NoCa`] if the directory has no CA.
pub fn run_command(cmd: PkiCommand) -> Result<(), PkiError> {
    match cmd {
        PkiCommand::Init { dir, name, days } => {
            let spec = EnsureSpec {
                ca_common_name: name,
                server: None,
                clients: Vec::new(),
                leaf_days: DEFAULT_LEAF_DAYS,
                ca_days: days,
                renew_before_days: DEFAULT_RENEW_BEFORE_DAYS,
            };
            let layout = PkiLayout::new(dir);
            let report = ensure(&layout, &spec)?;
            if report.is_unchanged() {
                say!("CA already exists: {}", layout.ca_cert().display());
            } else {
                say!("{report}");
            }
            say!("{}", CertSummary::from_pem_file(&layout.ca_cert())?);
        }
        PkiCommand::IssueServer {
            dir,
            dns,
            ips,
            days,
        } => {
            let layout = PkiLayout::new(dir);
            let names = ServerNames { dns, ips };
            issue(
                &layout,
                &layout.server_cert(),
                &layout.server_key(),
                |ca, key| ca.issue_server(&names, Validity::days_from_now(days), key),
            )?;
        }
        PkiCommand::IssueClient { dir, name, days } => {
            let layout = PkiLayout::new(dir);
            issue(
                &layout,
                &layout.client_cert(&name),
                &layout.client_key(&name),
                |ca, key| ca.issue_client(&name, Validity::days_from_now(days), key),
            )?;
        }
        PkiCommand::Ensure {
            dir,
            ca_name,
            dns,
            ips,
            no_server,
            clients,
            days,
            ca_days,
            renew_before_days,
        } => {
            let spec = EnsureSpec {
                ca_common_name: ca_name,
                server: (!no_server).then_some(ServerNames { dns, ips }),
                clients,
                leaf_days: days,
                ca_days,
                renew_before_days,
            };
            let report = ensure(&PkiLayout::new(dir), &spec)?;
            say!("{report}");
        }
        PkiCommand::Show { path } => show(&path)?,
        PkiCommand::Revoke { dir, name } => {
            let layout = PkiLayout::new(dir);
            let report = super::revoke(&layout, &layout.client_cert(&name))?;
            if report.already_revoked {
                say!("{name} was already revoked");
            } else {
                say!("revoked {name}");
            }
            say!(
                "{}: {} revoked certificate(s); reload vmd (SIGHUP) to apply",
                report.crl.display(),
                report.revoked.len()
            );
        }
    }
    Ok(())
}

/// Issues one leaf certificate with the CA in `layout`, reusing the key at
/// `key_path` if there is one, and writes it.
fn issue(
    layout: &PkiLayout,
    cert_path: &Path,
    key_path: &Path,
    issue: impl FnOnce(&CertificateAuthority, Option<&KeyPairPem>) -> Result<IssuedCert, PkiError>,
) -> Result<(), PkiError> {
    let (ca_cert, ca_key) = (layout.ca_cert(), layout.ca_key());
    if store::read_optional(&ca_cert)?.is_none() {
        return Err(PkiError::NoCa {
            dir: layout.dir().to_owned(),
        });
    }
    let ca = CertificateAuthority::load(&ca_cert, &ca_key)?;
    let key = store::read_optional_key(key_path)?;
    let issued = issue(&ca, key.as_ref())?;
    let cert_existed = store::read_optional(cert_path)?.is_some();
    store::write_issued(cert_path, key_path, &issued)?;
    let verb = if cert_existed { "renewed" } else { "created" };
    say!("{verb:<10}{}", cert_path.display());
    if key.is_some() {
        say!("{:<10}{}", "kept", key_path.display());
    } else {
        say!("{:<10}{}", "created", key_path.display());
    }
    say!("{}", CertSummary::from_pem_file(cert_path)?);
    Ok(())
}

/// Prints every certificate in a file, or in a PKI directory.
fn show(path: &Path) -> Result<(), PkiError> {
    let is_dir = std::fs::metadata(path)
        .map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })?
        .is_dir();
    if !is_dir {
        return show_file(path);
    }
    let layout = PkiLayout::new(path);
    let mut files = Vec::new();
    for file in [layout.ca_cert(), layout.server_cert()] {
        if file.exists() {
            files.push(file);
        }
    }
    let clients_dir = layout.clients_dir();
    match std::fs::read_dir(&clients_dir) {
        Ok(entries) => {
            let mut clients = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| PkiError::Read {
                    path: clients_dir.clone(),
                    source,
                })?;
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "pem") {
                    clients.push(p);
                }
            }
            clients.sort();
            files.extend(clients);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Read {
                path: clients_dir,
                source,
            });
        }
    }
    if files.is_empty() {
        say!("no certificates in {}", path.display());
    }
    for (i, file) in files.iter().enumerate() {
        if i > 0 {
            say!();
        }
        show_file(file)?;
    }
    Ok(())
}

/// Prints every certificate in one PEM file.
fn show_file(path: &Path) -> Result<(), PkiError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|source| PkiError::CertPem {
        path: path.to_owned(),
        source,
    })?;
    let mut count = 0usize;
    for der in iter {
        let der = der.map_err(|source| PkiError::CertPem {
            path: path.to_owned(),
            source,
        })?;
        let summary = CertSummary::from_der(&der).map_err(|e| match e {
            PkiError::CertDer { source } => PkiError::CertParse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        if count > 0 {
            say!();
        }
        say!("== {}", path.display());
        say!("{summary}");
        count += 1;
    }
    if count == 0 {
        return Err(PkiError::CertPem {
            path: path.to_owned(),
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(())
}
