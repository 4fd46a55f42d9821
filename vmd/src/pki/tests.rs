#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use clap::{CommandFactory as _, Parser};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::{Duration, OffsetDateTime};

use super::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn dev_pki() -> (tempfile::TempDir, PkiLayout) {
    let tmp = tempfile::tempdir().unwrap();
    let layout = PkiLayout::new(tmp.path().join("pki"));
    ensure(&layout, &EnsureSpec::dev()).unwrap();
    (tmp, layout)
}

fn dev_admin() -> ClientName {
    "dev-admin".parse().unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca_pem).unwrap())
        .unwrap();
    Arc::new(roots)
}

fn client_verifies(ca_pem: &Path, client_pem: &Path) -> bool {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider())
        .build()
        .unwrap();
    let end_entity = CertificateDer::from_pem_file(client_pem).unwrap();
    verifier
        .verify_client_cert(&end_entity, &[], UnixTime::now())
        .is_ok()
}

fn server_verifies(ca_pem: &Path, server_pem: &Path, name: &str) -> bool {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_pem), provider())
        .build()
        .unwrap();
    let end_entity = CertificateDer::from_pem_file(server_pem).unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(&end_entity, &[], &name, &[], UnixTime::now())
        .is_ok()
}

#[test]
fn client_name_accepts_dns_labels() {
    for ok in ["a", "dev-admin", "x1", "0", &"a".repeat(63)] {
        let name: ClientName = ok.parse().unwrap();
        assert_eq!(name.as_str(), ok);
        assert_eq!(name.to_string(), ok);
    }
    assert!(ClientName::try_from("admin".to_owned()).is_ok());
}

#[test]
fn client_name_rejects_invalid() {
    let too_long = "a".repeat(64);
    for bad in [
        "",
        "-a",
        "a-",
        "a/b",
        "A..",
        "a.b",
        "Admin",
        "a b",
        "..",
        too_long.as_str(),
    ] {
        let err = bad.parse::<ClientName>().unwrap_err();
        assert_eq!(err.name(), bad);
    }
}

#[test]
fn ensure_twice_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = PkiLayout::new(tmp.path().join("pki"));
    let spec = EnsureSpec::dev();

    let first = ensure(&layout, &spec).unwrap();
    let admin = dev_admin();
    for path in [
        layout.ca_cert(),
        layout.ca_key(),
        layout.server_cert(),
        layout.server_key(),
        layout.client_cert(&admin),
        layout.client_key(&admin),
    ] {
        assert!(
            first.created.contains(&path),
            "{} not created",
            path.display()
        );
    }
    assert!(first.renewed.is_empty());

    let read_all = || {
        [
            layout.ca_cert(),
            layout.ca_key(),
            layout.server_cert(),
            layout.server_key(),
            layout.client_cert(&admin),
            layout.client_key(&admin),
        ]
        .map(|p| std::fs::read(p).unwrap())
    };
    let before = read_all();
    let second = ensure(&layout, &spec).unwrap();
    assert!(second.is_unchanged(), "second run wrote: {second:?}");
    assert!(second.created.is_empty() && second.renewed.is_empty());
    assert_eq!(second.unchanged.len(), 6);
    assert_eq!(before, read_all());
}

#[test]
fn file_and_directory_modes() {
    let (_tmp, layout) = dev_pki();
    let admin = dev_admin();
    assert_eq!(mode(layout.dir()), 0o700);
    assert_eq!(mode(&layout.clients_dir()), 0o700);
    for key in [
        layout.ca_key(),
        layout.server_key(),
        layout.client_key(&admin),
    ] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    for cert in [
        layout.ca_cert(),
        layout.server_cert(),
        layout.client_cert(&admin),
    ] {
        assert_eq!(mode(&cert), 0o644, "{}", cert.display());
    }
    // No temporary files are left behind.
    for dir in [layout.dir().to_owned(), layout.clients_dir()] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(!name.to_string_lossy().starts_with('.'), "{name:?}");
        }
    }
}

#[test]
fn expired_leaf_is_renewed_with_same_key() {
    let (_tmp, layout) = dev_pki();
    let ca = CertificateAuthority::load(&layout.ca_cert(), &layout.ca_key()).unwrap();
    let key = KeyPairPem::from_pem_file(&layout.server_key()).unwrap();
    let key_bytes = std::fs::read(layout.server_key()).unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(30),
        not_after: now - Duration::days(1),
    };
    let issued = ca
        .issue_server(&ServerNames::dev(), expired, Some(&key))
        .unwrap();
    write_issued(&layout.server_cert(), &layout.server_key(), &issued).unwrap();
    let old = CertSummary::from_pem_file(&layout.server_cert()).unwrap();
    assert!(old.expires_within(0));

    let report = ensure(&layout, &EnsureSpec::dev()).unwrap();
    assert_eq!(report.renewed, vec![layout.server_cert()]);
    assert!(report.created.is_empty());

    let new = CertSummary::from_pem_file(&layout.server_cert()).unwrap();
    assert_eq!(new.spki_sha256, old.spki_sha256);
    assert_eq!(new.spki_sha256, key.spki_sha256());
    assert!(!new.expires_within(DEFAULT_RENEW_BEFORE_DAYS));
    assert!(new.not_before <= OffsetDateTime::now_utc());
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), key_bytes);
    assert!(server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "vmd"
    ));
}

#[test]
fn expiring_client_cert_is_renewed() {
    let (_tmp, layout) = dev_pki();
    let admin = dev_admin();
    let ca = CertificateAuthority::load(&layout.ca_cert(), &layout.ca_key()).unwrap();
    let key = KeyPairPem::from_pem_file(&layout.client_key(&admin)).unwrap();
    let issued = ca
        .issue_client(&admin, Validity::days_from_now(10), Some(&key))
        .unwrap();
    write_issued(
        &layout.client_cert(&admin),
        &layout.client_key(&admin),
        &issued,
    )
    .unwrap();

    let report = ensure(&layout, &EnsureSpec::dev()).unwrap();
    assert_eq!(report.renewed, vec![layout.client_cert(&admin)]);
    let new = CertSummary::from_pem_file(&layout.client_cert(&admin)).unwrap();
    assert_eq!(new.spki_sha256, key.spki_sha256());
    assert!(!new.expires_within(300));
}

#[test]
fn corrupt_key_is_an_error_and_left_untouched() {
    let (_tmp, layout) = dev_pki();
    let garbage = b"-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n";
    std::fs::write(layout.server_key(), garbage).unwrap();
    std::fs::remove_file(layout.server_cert()).unwrap();

    let err = ensure(&layout, &EnsureSpec::dev()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&layout.server_key().display().to_string()),
        "{msg}"
    );
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), garbage);
    assert!(!layout.server_cert().exists());

    // Same for a key that is valid PEM but not a key at all.
    std::fs::write(layout.server_key(), "hello\n").unwrap();
    let err = ensure(&layout, &EnsureSpec::dev()).unwrap_err();
    assert!(matches!(err, PkiError::KeyPem { ref path, .. } if *path == layout.server_key()));
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), b"hello\n");
}

#[test]
fn corrupt_ca_is_an_error() {
    let (_tmp, layout) = dev_pki();
    std::fs::write(layout.ca_cert(), "garbage").unwrap();
    let err = ensure(&layout, &EnsureSpec::dev()).unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read(layout.ca_cert()).unwrap(), b"garbage");
}

#[test]
fn ca_cert_without_key_is_an_error() {
    let (_tmp, layout) = dev_pki();
    std::fs::remove_file(layout.ca_key()).unwrap();
    let err = ensure(&layout, &EnsureSpec::dev()).unwrap_err();
    assert!(matches!(err, PkiError::CaKeyMissing { .. }), "{err}");
    assert!(!layout.ca_key().exists());
}

#[test]
fn ca_key_not_matching_cert_is_an_error() {
    let (_tmp, layout) = dev_pki();
    let before = std::fs::read(layout.ca_key()).unwrap();
    std::fs::copy(layout.server_key(), layout.ca_key()).unwrap();
    let err = ensure(&layout, &EnsureSpec::dev()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    assert_ne!(std::fs::read(layout.ca_key()).unwrap(), before);
}

#[test]
fn missing_ca_cert_is_recreated_from_existing_key() {
    let (_tmp, layout) = dev_pki();
    let ca_key = std::fs::read(layout.ca_key()).unwrap();
    let spki = CertSummary::from_pem_file(&layout.ca_cert())
        .unwrap()
        .spki_sha256;
    std::fs::remove_file(layout.ca_cert()).unwrap();

    let report = ensure(&layout, &EnsureSpec::dev()).unwrap();
    assert_eq!(report.created, vec![layout.ca_cert()]);
    assert!(report.renewed.is_empty(), "{report:?}");
    assert_eq!(std::fs::read(layout.ca_key()).unwrap(), ca_key);
    let ca = CertSummary::from_pem_file(&layout.ca_cert()).unwrap();
    assert_eq!(ca.spki_sha256, spki);
    assert!(ca.is_ca);
    // Existing leaf certificates still chain to the re-created CA.
    assert!(client_verifies(
        &layout.ca_cert(),
        &layout.client_cert(&dev_admin())
    ));
}

#[test]
fn leaves_are_reissued_under_a_new_ca_with_their_keys() {
    let (_tmp, layout) = dev_pki();
    let admin = dev_admin();
    let client_key = std::fs::read(layout.client_key(&admin)).unwrap();
    std::fs::remove_file(layout.ca_cert()).unwrap();
    std::fs::remove_file(layout.ca_key()).unwrap();

    let report = ensure(&layout, &EnsureSpec::dev()).unwrap();
    assert!(report.created.contains(&layout.ca_key()));
    assert!(report.renewed.contains(&layout.server_cert()));
    assert!(report.renewed.contains(&layout.client_cert(&admin)));
    assert_eq!(
        std::fs::read(layout.client_key(&admin)).unwrap(),
        client_key
    );
    assert!(client_verifies(
        &layout.ca_cert(),
        &layout.client_cert(&admin)
    ));
}

#[test]
fn missing_san_is_added_with_same_key() {
    let (_tmp, layout) = dev_pki();
    let key = std::fs::read(layout.server_key()).unwrap();
    let mut spec = EnsureSpec::dev();
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    spec.server = Some(ServerNames {
        dns: vec!["host.example".to_owned()],
        ips: vec![ip],
    });
    let report = ensure(&layout, &spec).unwrap();
    assert_eq!(report.renewed, vec![layout.server_cert()]);
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), key);
    let summary = CertSummary::from_pem_file(&layout.server_cert()).unwrap();
    assert!(summary.dns_names.contains(&"host.example".to_owned()));
    assert!(summary.dns_names.contains(&"vmd".to_owned()));
    assert!(summary.ip_addresses.contains(&ip));
    assert!(ensure(&layout, &spec).unwrap().is_unchanged());
}

#[test]
fn new_client_is_added_without_touching_others() {
    let (_tmp, layout) = dev_pki();
    let mut spec = EnsureSpec::dev();
    let ops: ClientName = "ops".parse().unwrap();
    spec.clients.push(ops.clone());
    spec.clients.push(ops.clone());
    let report = ensure(&layout, &spec).unwrap();
    assert_eq!(
        report.created,
        vec![layout.client_key(&ops), layout.client_cert(&ops)]
    );
    assert!(report.renewed.is_empty());
}

#[test]
fn server_cert_has_sans_and_eku() {
    let (_tmp, layout) = dev_pki();
    let summary = CertSummary::from_pem_file(&layout.server_cert()).unwrap();
    assert_eq!(summary.subject_cn.as_deref(), Some("vmd"));
    assert_eq!(summary.issuer_cn.as_deref(), Some("vmd development CA"));
    assert_eq!(summary.dns_names, vec!["vmd", "localhost"]);
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    assert_eq!(summary.ip_addresses, vec![v4, v6]);
    assert!(!summary.is_ca);

    assert!(server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "vmd"
    ));
    assert!(server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "localhost"
    ));
    assert!(server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "127.0.0.1"
    ));
    assert!(!server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "other"
    ));
    // A server certificate is not a client certificate.
    assert!(!client_verifies(&layout.ca_cert(), &layout.server_cert()));
}

#[test]
fn client_cert_san_is_name() {
    let (_tmp, layout) = dev_pki();
    let summary = CertSummary::from_pem_file(&layout.client_cert(&dev_admin())).unwrap();
    assert_eq!(summary.dns_names, vec!["dev-admin"]);
    assert_eq!(summary.subject_cn.as_deref(), Some("dev-admin"));
    assert!(summary.ip_addresses.is_empty());
    assert!(!summary.is_ca);
}

#[test]
fn ca_summary() {
    let (_tmp, layout) = dev_pki();
    let summary = CertSummary::from_pem_file(&layout.ca_cert()).unwrap();
    assert!(summary.is_ca);
    assert_eq!(summary.subject_cn.as_deref(), Some("vmd development CA"));
    assert!(!summary.expires_within(3000));
    assert!(summary.expires_within(3700));
    assert_eq!(summary.spki_sha256.len(), 64);
    let text = summary.to_string();
    assert!(text.contains("CN=vmd development CA"), "{text}");
    assert!(text.contains("ca:          yes"), "{text}");
}

#[test]
fn client_cert_verifies_only_against_its_ca() {
    let (_tmp, layout) = dev_pki();
    let (_tmp2, other) = dev_pki();
    let admin = dev_admin();
    assert!(client_verifies(
        &layout.ca_cert(),
        &layout.client_cert(&admin)
    ));
    assert!(client_verifies(
        &other.ca_cert(),
        &other.client_cert(&admin)
    ));
    assert!(!client_verifies(
        &layout.ca_cert(),
        &other.client_cert(&admin)
    ));
    assert!(!client_verifies(
        &other.ca_cert(),
        &layout.client_cert(&admin)
    ));
}

#[test]
fn in_memory_ca_issues_verifiable_client_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test CA", Validity::days_from_now(10)).unwrap();
    let name: ClientName = "alice".parse().unwrap();
    let issued = ca
        .issue_client(&name, Validity::days_from_now(1), None)
        .unwrap();
    let ca_pem = tmp.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
    let cert = tmp.path().join("alice.pem");
    write_issued(&cert, &tmp.path().join("alice.key"), &issued).unwrap();
    assert!(client_verifies(&ca_pem, &cert));
    assert_eq!(CertSummary::from_der(ca.cert_der()).unwrap(), *ca.summary());
    // The key PEM round-trips.
    let key = KeyPairPem::from_pem_file(&tmp.path().join("alice.key")).unwrap();
    assert_eq!(key.as_pem(), issued.key_pem);
    assert_eq!(
        key.spki_sha256(),
        CertSummary::from_pem_file(&cert).unwrap().spki_sha256
    );
}

#[test]
fn write_issued_never_replaces_a_different_key() {
    let (_tmp, layout) = dev_pki();
    let ca = CertificateAuthority::load(&layout.ca_cert(), &layout.ca_key()).unwrap();
    let before = std::fs::read(layout.server_key()).unwrap();
    let fresh = ca
        .issue_server(&ServerNames::dev(), Validity::days_from_now(1), None)
        .unwrap();
    let err = write_issued(&layout.server_cert(), &layout.server_key(), &fresh).unwrap_err();
    assert!(matches!(err, PkiError::KeyExists { .. }), "{err}");
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), before);
}

#[test]
fn renewals_get_distinct_serials() {
    let ca = CertificateAuthority::generate("test CA", Validity::days_from_now(10)).unwrap();
    let key = KeyPairPem::generate().unwrap();
    let name: ClientName = "bob".parse().unwrap();
    let a = ca
        .issue_client(&name, Validity::days_from_now(1), Some(&key))
        .unwrap();
    let b = ca
        .issue_client(&name, Validity::days_from_now(1), Some(&key))
        .unwrap();
    let serial = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let x509 = super::summary::parse_x509(&der).unwrap();
        x509.raw_serial().to_vec()
    };
    assert_ne!(serial(&a.cert_pem), serial(&b.cert_pem));
    assert_eq!(a.key_pem, b.key_pem);
}

#[test]
fn invalid_server_name_is_rejected() {
    let ca = CertificateAuthority::generate("test CA", Validity::days_from_now(10)).unwrap();
    let names = ServerNames {
        dns: vec!["bad name".to_owned()],
        ips: vec![],
    };
    let err = ca
        .issue_server(&names, Validity::days_from_now(1), None)
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidDnsName { .. }), "{err}");
}

#[test]
fn huge_validity_is_capped() {
    let v = Validity::days_from_now(u32::MAX);
    assert_eq!(v.not_after.year(), 9999);
    let ca = CertificateAuthority::generate("test CA", v).unwrap();
    assert_eq!(ca.summary().not_after.year(), 9999);
}

#[test]
fn pem_encoding_round_trips() {
    for len in 0..8 {
        let data: Vec<u8> = (0u8..=255).cycle().skip(len).take(100 + len).collect();
        let pem = store::pem_encode("CERTIFICATE", &data);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), data.as_slice());
    }
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: PkiCommand,
}

#[test]
fn cli_definition_is_valid_and_parses() {
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "pki", "ensure", "--dir", "/x", "--dns", "h", "--ip", "10.0.0.1", "--client", "a",
        "--client", "b",
    ])
    .unwrap();
    let PkiCommand::Ensure { clients, ips, .. } = cli.cmd else {
        panic!("wrong command");
    };
    assert_eq!(clients.len(), 2);
    assert_eq!(ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    assert!(Cli::try_parse_from(["pki", "issue-client", "--dir", "/x", "Bad/Name"]).is_err());
}

#[test]
fn commands_are_idempotent_and_keep_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let layout = PkiLayout::new(&dir);

    let err = run_command(PkiCommand::IssueServer {
        dir: dir.clone(),
        dns: vec![],
        ips: vec![],
        days: 1,
    })
    .unwrap_err();
    assert!(matches!(err, PkiError::NoCa { .. }), "{err}");

    let init = || PkiCommand::Init {
        dir: dir.clone(),
        name: "vmd CA".to_owned(),
        days: DEFAULT_CA_DAYS,
    };
    run_command(init()).unwrap();
    let ca_key = std::fs::read(layout.ca_key()).unwrap();
    let ca_cert = std::fs::read(layout.ca_cert()).unwrap();
    run_command(init()).unwrap();
    assert_eq!(std::fs::read(layout.ca_key()).unwrap(), ca_key);
    assert_eq!(std::fs::read(layout.ca_cert()).unwrap(), ca_cert);

    let name: ClientName = "carol".parse().unwrap();
    let issue = || PkiCommand::IssueClient {
        dir: dir.clone(),
        name: name.clone(),
        days: 30,
    };
    run_command(issue()).unwrap();
    let key = std::fs::read(layout.client_key(&name)).unwrap();
    run_command(issue()).unwrap();
    assert_eq!(std::fs::read(layout.client_key(&name)).unwrap(), key);
    assert!(client_verifies(
        &layout.ca_cert(),
        &layout.client_cert(&name)
    ));

    let server = || PkiCommand::IssueServer {
        dir: dir.clone(),
        dns: vec!["localhost".to_owned()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        days: 30,
    };
    run_command(server()).unwrap();
    let key = std::fs::read(layout.server_key()).unwrap();
    run_command(server()).unwrap();
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), key);
    assert!(server_verifies(
        &layout.ca_cert(),
        &layout.server_cert(),
        "localhost"
    ));

    let ensure_cmd = || PkiCommand::Ensure {
        dir: dir.clone(),
        ca_name: "ignored".to_owned(),
        dns: vec![],
        ips: vec![],
        no_server: false,
        clients: vec![name.clone()],
        days: 365,
        ca_days: DEFAULT_CA_DAYS,
        renew_before_days: 7,
    };
    run_command(ensure_cmd()).unwrap();
    run_command(ensure_cmd()).unwrap();
    assert_eq!(std::fs::read(layout.ca_key()).unwrap(), ca_key);
    assert_eq!(std::fs::read(layout.server_key()).unwrap(), key);

    run_command(PkiCommand::Show { path: dir.clone() }).unwrap();
    run_command(PkiCommand::Show {
        path: layout.server_cert(),
    })
    .unwrap();
    let err = run_command(PkiCommand::Show {
        path: layout.server_key(),
    })
    .unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
}

#[test]
fn leaves_in_the_old_encoding_are_reissued_in_strict_der() {
    let (_tmp, layout) = dev_pki();
    let admin = dev_admin();
    let fresh = std::fs::read(layout.client_cert(&admin)).unwrap();
    let der = CertificateDer::from_pem_slice(&fresh).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!ca::encodes_default_basic_constraints(&x509));
    assert!(
        x509.basic_constraints()
            .unwrap()
            .is_some_and(|bc| bc.critical && !bc.value.ca),
        "an end entity, marked as one"
    );

    // What vmd's PKI wrote before: BasicConstraints spelling out cA FALSE.
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(layout.ca_key()).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(layout.ca_cert()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key_pem = std::fs::read_to_string(layout.client_key(&admin)).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["dev-admin".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let old = params.signed_by(&key, &issuer).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(old.der()).unwrap();
    assert!(ca::encodes_default_basic_constraints(&x509));
    std::fs::write(layout.client_cert(&admin), old.pem()).unwrap();

    let report = ensure(&layout, &EnsureSpec::dev()).unwrap();
    assert_eq!(report.renewed, vec![layout.client_cert(&admin)]);
    let renewed = std::fs::read(layout.client_cert(&admin)).unwrap();
    let der = CertificateDer::from_pem_slice(&renewed).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!ca::encodes_default_basic_constraints(&x509));
    assert_eq!(
        std::fs::read_to_string(layout.client_key(&admin)).unwrap(),
        key_pem
    );
    assert!(client_verifies(
        &layout.ca_cert(),
        &layout.client_cert(&admin)
    ));
}
