//! The hybrid vsock listener: for a VM that declares `vsock_uds`, the
//! daemon listens on `<vsock_uds>_<port>`, where the hypervisor (or
//! vhost-device-vsock) delivers its guest's AF_VSOCK connections to the
//! host. The socket a connection arrives on says which VM it is from, and
//! the policy's vsock binding holds against that. Here the test connects
//! to that socket itself, as the hypervisor would; the guest-side run is in
//! the guest suite.

use vmd::policy::{Binding, IdentityRule};
use vmd::transport::ListenAddr;
use vmd_client::{Client, ClientError, ConnectOptions, Endpoint};
use vmd_proto::{ErrorReply, Role, VmName};
use vmd_tests::TestServer;

#[tokio::test]
async fn hybrid_sockets_name_their_vm_and_bind_identities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gui, app) = (dir.path().join("gui.vsock"), dir.path().join("app.vsock"));
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        format!(
            "[vm.gui-vm]\nvsock_cid = 3\nvsock_uds = {:?}\n[vm.app-vm]\nvsock_cid = 4\nvsock_uds = {:?}\n",
            gui.display().to_string(),
            app.display().to_string()
        ),
    )
    .expect("inventory");
    let server = TestServer::start_with(|c| {
        c.vms.inventory.file = Some(inventory.clone());
        c.hybrid_vsock_port = Some(9876);
        c.policy.identities = vec![IdentityRule {
            binding: Some(Binding::Vm(VmName::new("gui-vm").expect("valid"))),
            ..IdentityRule::new("gui-vm", Some(Role::Reader))
        }];
    })
    .await;
    let hybrid: Vec<_> = server
        .addrs
        .iter()
        .filter_map(|a| match a {
            ListenAddr::HybridVsock { vm, path } => Some((vm.to_string(), path.clone())),
            _ => None,
        })
        .collect();
    let gui_socket = dir.path().join("gui.vsock_9876");
    let app_socket = dir.path().join("app.vsock_9876");
    assert!(
        hybrid.contains(&("gui-vm".into(), gui_socket.clone())),
        "{hybrid:?}"
    );
    assert!(
        hybrid.contains(&("app-vm".into(), app_socket.clone())),
        "{hybrid:?}"
    );

    let tls = server.pki.client("gui-vm");
    let options = ConnectOptions::default();
    let via = |path: &std::path::Path| Endpoint::HybridVsock {
        path: path.to_owned(),
        port: 9876,
    };

    // gui-vm's certificate through gui-vm's socket: served.
    let stream = tokio::net::UnixStream::connect(&gui_socket)
        .await
        .expect("connect");
    let client = Client::over_stream(stream, &via(&gui_socket), &tls, &options)
        .await
        .expect("gui-vm through its own socket");
    assert_eq!(client.welcome().identity, "gui-vm");
    assert_eq!(client.welcome().role, Some(Role::Reader));
    client.host().await.expect("served");

    // The same certificate through app-vm's socket: refused at Hello.
    let stream = tokio::net::UnixStream::connect(&app_socket)
        .await
        .expect("connect");
    match Client::over_stream(stream, &via(&app_socket), &tls, &options).await {
        Err(ClientError::Refused(ErrorReply::Forbidden { reason })) => {
            assert!(reason.contains("not bound to VM app-vm"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // An identity without binding may use either.
    let stream = tokio::net::UnixStream::connect(&app_socket)
        .await
        .expect("connect");
    let other = Client::over_stream(
        stream,
        &via(&app_socket),
        &server.pki.client("someone"),
        &options,
    )
    .await
    .expect("unbound identity");
    other.host().await.expect("served (default reader role)");

    // A stale socket file from an earlier run does not stop a restart.
    let _pki = server.stop().await;
    assert!(gui_socket.exists(), "the socket file stays after exit");
    let again = TestServer::start_with(|c| {
        c.vms.inventory.file = Some(inventory.clone());
        c.hybrid_vsock_port = Some(9876);
    })
    .await;
    assert!(
        again
            .addrs
            .iter()
            .any(|a| matches!(a, ListenAddr::HybridVsock { .. }))
    );
    again.stop().await;
}
