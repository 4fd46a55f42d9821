//! TLS 1.3 session resumption against the real server: a client that kept
//! vmd's tickets resumes and is still the identity of its certificate; a
//! reload (new CRLs or policy) makes the old tickets useless, so the next
//! session is a full handshake again.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use rustls::HandshakeKind;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use vmd::config::Config;
use vmd::transport::ListenAddr;
use vmd::vms::inventory::InventorySource;
use vmd_client::ClientTls;
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{Hello, HelloReply, PROTOCOL_VERSION, Role};
use vmd_tests::{TestPki, raw_session};

/// One session: TLS, `Hello`, `Welcome` (which brings the tickets along).
/// Returns how TLS went and who the server says the client is.
async fn session(addr: SocketAddr, tls: &ClientTls) -> (HandshakeKind, String) {
    let stream = raw_session(addr, tls.config().clone())
        .await
        .expect("TLS handshake");
    let kind = stream.get_ref().1.handshake_kind().expect("handshake done");
    let mut framed = Framed::new(
        stream,
        FrameCodec::<HelloReply, Hello>::new(MAX_REPLY_FRAME, MAX_REQUEST_FRAME),
    );
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_name: "resumption-test".into(),
    };
    framed.send(&hello).await.expect("Hello sent");
    let reply = framed
        .next()
        .await
        .expect("a reply")
        .expect("a frame")
        .expect("decodes");
    let welcome = reply.expect("welcomed");
    (kind, welcome.identity)
}

#[tokio::test]
async fn sessions_resume_until_the_server_reloads() {
    let pki = TestPki::new();
    let mut config = Config {
        tcp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        vsock: None,
        hybrid_vsock_port: None,
        tls: pki.server_paths(),
        ..Config::default()
    };
    config.policy.default_role = Some(Role::Reader);
    config.vms.inventory = InventorySource {
        state_dir: pki.scratch().join("microvms"),
        file: Some(pki.scratch().join("inventory.toml")),
    };
    let server = vmd::Server::bind(&config).await.expect("binds");
    let handle = server.handle();
    let addr = server
        .local_addrs()
        .iter()
        .find_map(|a| match a {
            ListenAddr::Tcp(addr) => Some(*addr),
            _ => None,
        })
        .expect("a TCP listener");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(cancel.clone().cancelled_owned()));

    let tls = pki.client("alice");
    assert_eq!(
        session(addr, &tls).await,
        (HandshakeKind::Full, "alice".into())
    );
    assert_eq!(
        session(addr, &tls).await,
        (HandshakeKind::Resumed, "alice".into()),
        "the kept ticket resumes, as the same identity"
    );
    assert_eq!(
        session(addr, &tls.without_resumption()).await.0,
        HandshakeKind::Full,
        "a client without tickets always runs a full handshake"
    );

    handle.reload(&config).expect("reload");
    assert_eq!(
        session(addr, &tls).await,
        (HandshakeKind::Full, "alice".into()),
        "tickets from before the reload do not resume"
    );
    assert_eq!(session(addr, &tls).await.0, HandshakeKind::Resumed);

    cancel.cancel();
    task.await.expect("server stops");
}
