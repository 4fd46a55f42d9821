//! The TLS layer refuses clients without a certificate of the vmd CA, and
//! the daemon keeps serving a good client throughout.

use rustls::AlertDescription;
use time::{Duration as TimeDuration, OffsetDateTime};
use vmd::pki::{CertificateAuthority, Validity};
use vmd_client::{Client, ClientError, ClientTls};
use vmd_tests::TestServer;

/// The TLS alert the server sent, from a failed connect.
fn alert(err: &ClientError) -> Option<AlertDescription> {
    match err.rustls_error() {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

async fn refused(server: &TestServer, tls: &ClientTls) -> ClientError {
    let err = Client::connect(&server.endpoint(), tls)
        .await
        .expect_err("the server must refuse this client");
    assert!(
        matches!(err, ClientError::Tls { .. }),
        "not a TLS refusal: {err:?}"
    );
    err
}

#[tokio::test]
async fn refused_without_client_certificate_and_good_client_unaffected() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    let config = vmd_client::tls::builder()
        .expect("TLS 1.3")
        .with_root_certificates(server.pki.roots())
        .with_no_client_auth();
    let tls = ClientTls::from_config(config, vmd_proto::SERVER_NAME).expect("tls");
    let err = refused(&server, &tls).await;
    assert_eq!(
        alert(&err),
        Some(AlertDescription::CertificateRequired),
        "{err:?}"
    );

    good.host().await.expect("good client still served");
    server.stop().await;
}

#[tokio::test]
async fn refused_with_certificate_from_another_ca() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    let other = CertificateAuthority::generate("impostor CA", Validity::days_from_now(30))
        .expect("other CA");
    let tls = server
        .pki
        .client_from(&other, "gui-vm", Validity::days_from_now(30));
    let err = refused(&server, &tls).await;
    assert_eq!(alert(&err), Some(AlertDescription::UnknownCA), "{err:?}");

    good.host().await.expect("good client still served");
    server.stop().await;
}

#[tokio::test]
async fn refused_with_expired_certificate() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    let ca = CertificateAuthority::load(
        &server.pki.ca_cert(),
        &server.pki.ca_cert().with_file_name("ca.key"),
    )
    .expect("test CA");
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - TimeDuration::days(10),
        not_after: now - TimeDuration::days(1),
    };
    let tls = server.pki.client_from(&ca, "gui-vm", expired);
    let err = refused(&server, &tls).await;
    assert_eq!(
        alert(&err),
        Some(AlertDescription::CertificateExpired),
        "{err:?}"
    );

    // A not-yet-valid certificate is refused as well.
    let future = Validity {
        not_before: now + TimeDuration::days(1),
        not_after: now + TimeDuration::days(10),
    };
    let tls = server.pki.client_from(&ca, "gui-vm", future);
    refused(&server, &tls).await;

    good.host().await.expect("good client still served");
    server.stop().await;
}

/// The client refuses a server whose certificate does not carry the name
/// it expects.
#[tokio::test]
async fn client_refuses_wrong_server_name() {
    let server = TestServer::start().await;
    let config = vmd_client::tls::builder()
        .expect("TLS 1.3")
        .with_root_certificates(server.pki.roots())
        .with_no_client_auth();
    let tls = ClientTls::from_config(config, "not-vmd.example").expect("tls");
    let err = Client::connect(&server.endpoint(), &tls)
        .await
        .expect_err("name mismatch");
    assert!(
        matches!(
            err.rustls_error(),
            Some(rustls::Error::InvalidCertificate(_))
        ),
        "{err:?}"
    );
    server.stop().await;
}
