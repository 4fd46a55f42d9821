//! A good client against the real daemon over real TLS: the session, the
//! host probe against this machine's /dev/kvm, pipelining, endpoint lists,
//! idle timeout and graceful shutdown.

use std::time::Duration;

use vmd_client::{Client, ClientError, ConnectOptions, Endpoint};
use vmd_proto::{ErrorReply, PROTOCOL_VERSION, Role, Virtualization, VmName};
use vmd_tests::TestServer;

#[tokio::test]
async fn welcome_names_the_certificate_identity() {
    let server = TestServer::start().await;
    let client = server.client("gui-vm").await;
    let welcome = client.welcome();
    assert_eq!(welcome.protocol, PROTOCOL_VERSION);
    assert_eq!(welcome.identity, "gui-vm");
    assert_eq!(welcome.server_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(welcome.role, Some(Role::Reader));
    client.close().await;
    server.stop().await;
}

/// The Host reply carries what /dev/kvm on this machine says, read by the
/// test itself through kvm-ioctls; without usable KVM it must say why.
#[tokio::test]
async fn host_reply_matches_this_machines_kvm() {
    let server = TestServer::start().await;
    let client = server.client("reader").await;
    let host = client.host().await.expect("host reply");

    assert_eq!(host.vmd_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        host.kernel,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .expect("kernel release")
            .trim()
    );
    assert!(host.memory.total.0 > 0 && host.memory.available <= host.memory.total);
    assert!(host.cpu.logical_cpus >= 1);

    match (kvm_ioctls::Kvm::new(), &host.virtualization) {
        (Ok(kvm), Virtualization::Available(info)) => {
            assert_eq!(info.api_version, kvm.get_api_version());
            assert_eq!(info.api_version, 12);
            assert_eq!(info.recommended_vcpus as usize, kvm.get_nr_vcpus());
            assert_eq!(info.max_vcpus as usize, kvm.get_max_vcpus());
            assert_eq!(info.max_memslots as usize, kvm.get_nr_memslots());
            let irqfd = info.capabilities.iter().find(|c| c.name == "irqfd");
            assert_eq!(
                irqfd.map(|c| c.supported),
                Some(kvm.check_extension(kvm_ioctls::Cap::Irqfd))
            );
        }
        (Err(_), Virtualization::Unavailable { reason }) => {
            if cfg!(feature = "host-kvm") {
                panic!("host-kvm needs a usable /dev/kvm: {reason}");
            }
            assert!(reason.contains("/dev/kvm"), "{reason}");
        }
        (kvm, reported) => panic!(
            "daemon and test disagree: test opened KVM: {}, daemon says {reported:?}",
            kvm.is_ok()
        ),
    }
    server.stop().await;
}

/// Under `host-kvm` a missing /dev/kvm fails instead of taking the
/// "unavailable" branch above.
#[cfg(feature = "host-kvm")]
#[test]
fn host_kvm_feature_requires_kvm() {
    let kvm = kvm_ioctls::Kvm::new().expect("host-kvm: /dev/kvm must open on this machine");
    assert_eq!(kvm.get_api_version(), 12);
}

#[tokio::test]
async fn empty_inventory_is_reported_honestly() {
    let server = TestServer::start().await;
    let client = server.client("reader").await;
    assert!(client.list_vms().await.expect("list").is_empty());
    let name = VmName::new("gui-vm").expect("valid");
    match client.get_vm(&name).await {
        Err(ClientError::Server(ErrorReply::NotFound { what })) => assert_eq!(what, "VM gui-vm"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Changes need a role this version grants nobody.
    match client.start(&name).await {
        Err(ClientError::Server(ErrorReply::Forbidden { .. })) => {}
        other => panic!("expected Forbidden, got {other:?}"),
    }
    server.stop().await;
}

/// Many requests in flight on one connection, from many tasks; each
/// response reaches the call that sent it.
#[tokio::test]
async fn pipelined_requests_are_matched_by_id() {
    let server = TestServer::start().await;
    let client = server.client("reader").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                client.host().await.map(|h| !h.hostname.is_empty())
            } else {
                client.list_vms().await.map(|vms| vms.is_empty())
            }
        });
    }
    let mut answered = 0;
    while let Some(result) = tasks.join_next().await {
        assert!(result.expect("task").expect("reply of the right kind"));
        answered += 1;
    }
    assert_eq!(answered, 200);
    server.stop().await;
}

/// An endpoint list falls through an unreachable endpoint to a good one,
/// and reports every failure when none works. (No vsock here: this machine
/// must never connect over AF_VSOCK itself.)
#[tokio::test]
async fn endpoint_list_falls_back_quickly() {
    let server = TestServer::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dead = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: closed,
    };
    let tls = server.pki.client("reader");
    let options = ConnectOptions {
        timeout: Duration::from_millis(500),
        ..ConnectOptions::default()
    };
    let client = Client::connect_any(&[dead.clone(), server.endpoint()], &tls, &options)
        .await
        .expect("second endpoint answers");
    assert_eq!(client.endpoint(), &server.endpoint());
    match Client::connect_any(&[dead.clone(), dead], &tls, &options).await {
        Err(ClientError::AllFailed(errors)) => {
            assert_eq!(errors.len(), 2);
            assert!(
                errors
                    .iter()
                    .all(|e| matches!(e, ClientError::Connect { .. }))
            );
        }
        other => panic!("expected AllFailed, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let server = TestServer::start_with(|c| c.limits.idle_timeout = Duration::from_secs(1)).await;
    let client = server.client("reader").await;
    client.host().await.expect("first request");
    // Long past the idle timeout the server has closed the session.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(client.host().await, Err(ClientError::Closed)));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_and_stops_accepting() {
    let server = TestServer::start().await;
    let client = server.client("reader").await;
    client.host().await.expect("served before shutdown");
    let addr = server.tcp_addr();
    server.stop().await;
    assert!(matches!(client.host().await, Err(ClientError::Closed)));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
