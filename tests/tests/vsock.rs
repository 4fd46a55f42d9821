//! The AF_VSOCK listener, bound for real on this machine's /dev/vsock.
//!
//! Only binding is tested here: this machine's vsock peer is the hypervisor
//! that runs it, so no test ever *connects* over AF_VSOCK from the host.
//! Guest-to-host round trips run inside test guests (a later suite).

#![cfg(feature = "host-vsock")]

use vmd::config::VsockConfig;
use vmd::transport::ListenAddr;
use vmd_tests::TestServer;

/// `VMADDR_PORT_ANY`: let the kernel choose.
const PORT_ANY: u32 = u32::MAX;

fn vsock_addr(server: &TestServer) -> (u32, u32) {
    server
        .addrs
        .iter()
        .find_map(|a| match a {
            ListenAddr::Vsock { cid, port } => Some((*cid, *port)),
            ListenAddr::Tcp(_) | ListenAddr::HybridVsock { .. } => None,
        })
        .expect("host-vsock: the daemon must bind AF_VSOCK on this machine")
}

#[tokio::test]
async fn daemon_binds_vsock_and_reports_the_port() {
    let server = TestServer::start_with(|c| {
        c.vsock = Some(VsockConfig {
            port: PORT_ANY,
            required: true,
        });
    })
    .await;
    let (cid, port) = vsock_addr(&server);
    assert_eq!(cid, u32::MAX, "bound to VMADDR_CID_ANY");
    assert_ne!(port, PORT_ANY, "the kernel chose a port");

    // The same port again cannot be bound: a required listener fails loudly,
    // an optional one is skipped with a warning and TCP carries on.
    let mut config = vmd::Config {
        tcp: vec!["127.0.0.1:0".parse().expect("addr")],
        vsock: Some(VsockConfig {
            port,
            required: true,
        }),
        tls: server.pki.server_paths(),
        ..vmd::Config::default()
    };
    let err = vmd::Server::bind(&config).await.expect_err("port taken");
    assert!(
        err.to_string().contains(&format!("vsock://any:{port}")),
        "{err}"
    );
    config.vsock = Some(VsockConfig {
        port,
        required: false,
    });
    let fallback = vmd::Server::bind(&config).await.expect("TCP only");
    assert!(
        fallback
            .local_addrs()
            .iter()
            .all(|a| matches!(a, ListenAddr::Tcp(_)))
    );

    // TCP keeps serving next to the vsock listener.
    server
        .client("reader")
        .await
        .host()
        .await
        .expect("TCP served");
    server.stop().await;
}

#[tokio::test]
async fn vsock_only_daemon_runs() {
    let server = TestServer::start_with(|c| {
        c.tcp.clear();
        c.vsock = Some(VsockConfig {
            port: PORT_ANY,
            required: true,
        });
    })
    .await;
    vsock_addr(&server);
    server.stop().await;
}
