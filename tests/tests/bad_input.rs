//! Bad input over real TLS: every case gets a clear error or a clean close,
//! the daemon never panics, and a concurrent good client is unaffected.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use vmd_proto::frame::{self, MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{ErrorReply, Hello, HelloReply, Op, PROTOCOL_VERSION, Reply, Request, Response};
use vmd_tests::{TestServer, raw_session};

/// Longest wait for the server's reaction in these tests.
const PATIENCE: Duration = Duration::from_secs(10);

/// Reads one frame body, or `None` at a clean end of stream.
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    let mut header = [0; 4];
    match timeout(PATIENCE, stream.read_exact(&mut header)).await {
        Err(_) => panic!("server neither answered nor closed"),
        Ok(Err(_)) => return None,
        Ok(Ok(_)) => {}
    }
    let len = frame::body_len(header, MAX_REPLY_FRAME).expect("server frame within limits");
    let mut body = vec![0; len];
    timeout(PATIENCE, stream.read_exact(&mut body))
        .await
        .expect("frame body in time")
        .expect("whole frame body");
    Some(body)
}

/// Asserts the server closes the connection (EOF or reset, no more frames).
async fn assert_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0; 64];
    match timeout(PATIENCE, stream.read(&mut buf)).await {
        Err(_) => panic!("server did not close the connection"),
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("expected close, got {n} more bytes"),
    }
}

async fn send_raw<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("write");
    stream.flush().await.expect("flush");
}

async fn send<S: AsyncWrite + Unpin, T: serde::Serialize>(stream: &mut S, msg: &T) {
    send_raw(
        stream,
        &frame::encode(msg, MAX_REQUEST_FRAME).expect("encode"),
    )
    .await;
}

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A raw TLS session with a good certificate, before `Hello`.
async fn raw(server: &TestServer) -> RawTls {
    raw_session(server.tcp_addr(), server.pki.raw_client_config("raw"))
        .await
        .expect("TLS")
}

/// Reads the server's answer to `Hello`.
async fn hello_reply(tls: &mut RawTls) -> HelloReply {
    let body = read_frame(tls).await.expect("a Hello reply");
    frame::decode(&body).expect("HelloReply")
}

/// A raw session that has completed `Hello`/`Welcome`.
async fn greeted(server: &TestServer) -> RawTls {
    let mut tls = raw(server).await;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_name: "raw test".into(),
    };
    send(&mut tls, &hello).await;
    let reply = hello_reply(&mut tls).await;
    assert!(reply.is_ok(), "{reply:?}");
    tls
}

fn response(body: &[u8]) -> Response {
    frame::decode(body).expect("a Response frame")
}

#[tokio::test]
async fn oversized_length_prefix_gets_an_error_and_a_close() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    // Before Hello.
    let mut tls = raw(&server).await;
    send_raw(&mut tls, &u32::MAX.to_be_bytes()).await;
    let reply = hello_reply(&mut tls).await;
    assert!(
        matches!(&reply, Err(ErrorReply::Malformed { reason }) if reason.contains("exceeds")),
        "{reply:?}"
    );
    assert_closed(&mut tls).await;

    // After Hello: one byte over the request limit.
    let mut tls = greeted(&server).await;
    send_raw(&mut tls, &(MAX_REQUEST_FRAME + 1).to_be_bytes()).await;
    let resp = response(&read_frame(&mut tls).await.expect("error reply"));
    assert_eq!(resp.id, 0);
    assert!(
        matches!(resp.result, Err(ErrorReply::Malformed { .. })),
        "{resp:?}"
    );
    assert_closed(&mut tls).await;

    good.host().await.expect("good client unaffected");
    server.stop().await;
}

#[tokio::test]
async fn garbage_bytes_get_an_error_and_a_close() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    // Another protocol entirely: its first bytes read as a huge length.
    let mut tls = raw(&server).await;
    send_raw(&mut tls, b"GET / HTTP/1.1\r\nHost: vmd\r\n\r\n").await;
    let reply = hello_reply(&mut tls).await;
    assert!(
        matches!(reply, Err(ErrorReply::Malformed { .. })),
        "{reply:?}"
    );
    assert_closed(&mut tls).await;

    // A well-framed Hello whose body is garbage.
    let mut tls = raw(&server).await;
    send_raw(&mut tls, &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await;
    let reply = hello_reply(&mut tls).await;
    assert!(
        matches!(reply, Err(ErrorReply::Malformed { .. })),
        "{reply:?}"
    );
    assert_closed(&mut tls).await;

    good.host().await.expect("good client unaffected");
    server.stop().await;
}

/// A framed but undecodable request is answered (with its id when it can
/// be read) and the session goes on: the stream is still in sync.
#[tokio::test]
async fn undecodable_requests_are_answered_and_the_session_continues() {
    let server = TestServer::start().await;
    let mut tls = greeted(&server).await;

    // Request id 5 with an operation this server does not know (variant 200).
    send_raw(&mut tls, &[0, 0, 0, 3, 5, 0xc8, 0x01]).await;
    let resp = response(&read_frame(&mut tls).await.expect("reply"));
    assert_eq!(resp.id, 5);
    assert!(
        matches!(resp.result, Err(ErrorReply::Malformed { .. })),
        "{resp:?}"
    );

    // GetVm with an invalid VM name ("../x") is refused at decode time.
    send_raw(&mut tls, &[0, 0, 0, 7, 6, 2, 4, b'.', b'.', b'/', b'x']).await;
    let resp = response(&read_frame(&mut tls).await.expect("reply"));
    assert_eq!(resp.id, 6);
    assert!(
        matches!(resp.result, Err(ErrorReply::Malformed { .. })),
        "{resp:?}"
    );

    // A valid request on the same session still works.
    send(
        &mut tls,
        &Request {
            id: 7,
            body: Op::Host,
        },
    )
    .await;
    let resp = response(&read_frame(&mut tls).await.expect("reply"));
    assert_eq!(resp.id, 7);
    assert!(matches!(resp.result, Ok(Reply::Host(_))), "{resp:?}");
    server.stop().await;
}

#[tokio::test]
async fn truncated_frame_is_a_clean_close() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    let mut tls = greeted(&server).await;
    // Announce 100 bytes, send 10, then close our side.
    send_raw(&mut tls, &[0, 0, 0, 100]).await;
    send_raw(&mut tls, &[0; 10]).await;
    tls.shutdown().await.expect("close_notify");
    assert_closed(&mut tls).await;

    good.host().await.expect("good client unaffected");
    server.stop().await;
}

#[tokio::test]
async fn unknown_protocol_version_is_refused_with_the_versions() {
    let server = TestServer::start().await;
    let good = server.client("good").await;

    let mut tls = raw(&server).await;
    let hello = Hello {
        protocol: 999,
        client_name: "from the future".into(),
    };
    send(&mut tls, &hello).await;
    let reply = hello_reply(&mut tls).await;
    assert_eq!(
        reply,
        Err(ErrorReply::VersionMismatch {
            client: 999,
            server: PROTOCOL_VERSION
        })
    );
    assert_closed(&mut tls).await;

    good.host().await.expect("good client unaffected");
    server.stop().await;
}

/// A client that connects and never speaks TLS is dropped after the
/// handshake timeout; one that stalls mid-frame after the idle timeout.
#[tokio::test]
async fn slow_clients_are_cut_off() {
    let server = TestServer::start_with(|c| {
        c.limits.handshake_timeout = Duration::from_secs(1);
        c.limits.idle_timeout = Duration::from_secs(1);
    })
    .await;

    let mut silent = tokio::net::TcpStream::connect(server.tcp_addr())
        .await
        .expect("TCP connect");
    assert_closed(&mut silent).await;

    let mut stalled = greeted(&server).await;
    send_raw(&mut stalled, &[0, 0, 0, 50, 1, 2]).await;
    assert_closed(&mut stalled).await;

    // (A good client idle as long would be closed too, so connect one now.)
    let good = server.client("good").await;
    good.host().await.expect("good client served");
    server.stop().await;
}

/// With the connection cap reached, a new client waits (in the kernel's
/// backlog) instead of being served, and gets in once a slot frees up.
#[tokio::test]
async fn connection_cap_pushes_back_and_recovers() {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections = 1;
        c.limits.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    // Holds the only slot until its handshake times out.
    let _silent = tokio::net::TcpStream::connect(server.tcp_addr())
        .await
        .expect("TCP connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = timeout(PATIENCE, server.client("patient"))
        .await
        .expect("served once the slot frees");
    client.host().await.expect("served");
    server.stop().await;
}
