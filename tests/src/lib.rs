//! Test harness: the real daemon on an ephemeral port with a fresh PKI,
//! reached through the real client library or raw TLS.
//!
//! - [`TestPki`]: a CA, a server certificate and client certificates in a
//!   temporary directory, made by vmd's own `pki` module.
//! - [`TestServer`]: `vmd::Server` bound to `127.0.0.1:0`, running on the
//!   test's runtime, stopped (gracefully) by [`TestServer::stop`].
//! - [`raw_session`]: a TLS connection with no protocol logic, for feeding
//!   the daemon bad bytes.
//! - [`vmd()`], [`vmctl()`]: the binaries built by this workspace.
//! - [`guest`]: QEMU guests with a Debian kernel and real AF_VSOCK.
//! - [`microvm`], [`nspawn`], [`qemu`], [`process`]: a microvm host in
//!   systemd-nspawn, QEMU processes, the daemon as a process.
//! - [`qmp`]: another client of a VM's main QMP socket.
//! - [`rig`]: that microvm host with vmd serving it, for `vmctl` tests.
//! - [`demo`]: that host served by the `vmd` binary in development mode,
//!   for newcomers (`vmd-demo`, `scripts/demo`).
//! - [`tmux`]: a terminal program under a private tmux server.

#![forbid(unsafe_code)]

pub mod demo;
pub mod guest;
pub mod microvm;
pub mod nspawn;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod rig;
pub mod scrape;
pub mod tmux;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use vmd::config::{Config, TlsPaths};
use vmd::pki::{
    self, CertificateAuthority, ClientName, EnsureSpec, PkiLayout, ServerNames, Validity,
};
use vmd::transport::ListenAddr;
use vmd_client::{Client, ClientTls, Endpoint};

/// A throwaway PKI made by `vmd pki`'s code.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
    layout: PkiLayout,
    ca: CertificateAuthority,
}

impl TestPki {
    /// A CA, a server certificate for `vmd`/`localhost`/127.0.0.1, no clients.
    ///
    /// # Panics
    /// If the PKI cannot be created (a broken test environment).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let layout = PkiLayout::new(dir.path().join("pki"));
        let spec = EnsureSpec {
            server: Some(ServerNames::dev()),
            clients: Vec::new(),
            ..EnsureSpec::dev()
        };
        pki::ensure(&layout, &spec).expect("test PKI");
        let ca = CertificateAuthority::load(&layout.ca_cert(), &layout.ca_key()).expect("test CA");
        Self { dir, layout, ca }
    }

    /// The server's TLS files.
    pub fn server_paths(&self) -> TlsPaths {
        TlsPaths::in_pki_dir(self.layout.dir())
    }

    /// The CA certificate file.
    pub fn ca_cert(&self) -> PathBuf {
        self.layout.ca_cert()
    }

    /// The CA that signs this PKI's certificates.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Where this PKI lives (`vmd pki` layout).
    pub fn layout(&self) -> &PkiLayout {
        &self.layout
    }

    /// A scratch directory that lives as long as this PKI.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// A client of this CA named `name`, valid for a year.
    ///
    /// # Panics
    /// If issuing fails.
    pub fn client(&self, name: &str) -> ClientTls {
        self.client_from(&self.ca, name, Validity::days_from_now(365))
    }

    /// A client certificate issued by `ca` (maybe another CA) with the
    /// given validity, trusting this PKI's CA for the server.
    ///
    /// # Panics
    /// If issuing or loading fails.
    pub fn client_from(
        &self,
        ca: &CertificateAuthority,
        name: &str,
        validity: Validity,
    ) -> ClientTls {
        let (cert, key) = self.client_files(ca, name, validity);
        ClientTls::from_files(&self.ca_cert(), &cert, &key, vmd_proto::SERVER_NAME)
            .expect("client TLS")
    }

    /// Writes a client certificate and key issued by `ca`; returns the paths.
    ///
    /// # Panics
    /// If issuing or writing fails.
    pub fn client_files(
        &self,
        ca: &CertificateAuthority,
        name: &str,
        validity: Validity,
    ) -> (PathBuf, PathBuf) {
        let client: ClientName = name.parse().expect("valid client name");
        let issued = ca
            .issue_client(&client, validity, None)
            .expect("issue client");
        let dir = self
            .dir
            .path()
            .join("clients")
            .join(format!("{name}-{}", unique()));
        let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
        pki::write_issued(&cert, &key, &issued).expect("write client");
        (cert, key)
    }

    /// A rustls client config trusting this CA, with `name`'s certificate,
    /// for raw sessions.
    ///
    /// # Panics
    /// If issuing or loading fails.
    pub fn raw_client_config(&self, name: &str) -> Arc<rustls::ClientConfig> {
        self.raw_client_config_from(&self.ca, name)
    }

    /// As [`TestPki::raw_client_config`], with the certificate issued by
    /// `ca` (maybe another CA).
    ///
    /// # Panics
    /// If the certificate cannot be issued or loaded.
    pub fn raw_client_config_from(
        &self,
        ca: &CertificateAuthority,
        name: &str,
    ) -> Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let (cert, key) = self.client_files(ca, name, Validity::days_from_now(1));
        let chain = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
            .expect("cert file")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).expect("key");
        let mut config = vmd_client::tls::builder()
            .expect("TLS 1.3")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .expect("client auth");
        config.alpn_protocols = vec![vmd_client::tls::ALPN.to_vec()];
        Arc::new(config)
    }

    /// A root store holding this CA.
    ///
    /// # Panics
    /// If the CA file cannot be read.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.cert_der().clone())
            .expect("CA certificate");
        roots
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A running daemon.
#[derive(Debug)]
pub struct TestServer {
    /// Its PKI.
    pub pki: TestPki,
    /// Every bound address.
    pub addrs: Vec<ListenAddr>,
    /// The metrics listener's address, when the config turns it on.
    pub metrics_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl TestServer {
    /// The daemon on `127.0.0.1:0`, no vsock, default limits, an empty
    /// inventory, and every authenticated identity a reader.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// As [`TestServer::start`], with the config adjusted first.
    ///
    /// # Panics
    /// If the server cannot bind.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let pki = TestPki::new();
        let mut config = Config {
            tcp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            vsock: None,
            tls: pki.server_paths(),
            ..Config::default()
        };
        // Tests connect as many throwaway identities: let any of them read
        // (production defaults to no rights; see the policy tests).
        config.policy.default_role = Some(vmd_proto::Role::Reader);
        // An empty inventory of its own: never this machine's VMs.
        config.vms.inventory = vmd::vms::inventory::InventorySource {
            state_dir: pki.dir.path().join("microvms"),
            file: Some(pki.dir.path().join("inventory.toml")),
        };
        adjust(&mut config);
        let server = vmd::Server::bind(&config).await.expect("server binds");
        let addrs = server.local_addrs().to_vec();
        let metrics_addr = server.metrics_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.run(cancel.clone().cancelled_owned()));
        Self {
            pki,
            addrs,
            metrics_addr,
            cancel,
            task,
        }
    }

    /// The first TCP address.
    ///
    /// # Panics
    /// If the server has no TCP listener.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.addrs
            .iter()
            .find_map(|a| match a {
                ListenAddr::Tcp(addr) => Some(*addr),
                ListenAddr::Vsock { .. } | ListenAddr::HybridVsock { .. } => None,
            })
            .expect("server listens on TCP")
    }

    /// The TCP endpoint for clients.
    pub fn endpoint(&self) -> Endpoint {
        let addr = self.tcp_addr();
        Endpoint::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A connected client with a fresh certificate named `name`.
    ///
    /// # Panics
    /// If it cannot connect.
    pub async fn client(&self, name: &str) -> Client {
        Client::connect(&self.endpoint(), &self.pki.client(name))
            .await
            .expect("client connects")
    }

    /// `vmctl` flags that reach this server as `identity` (a fresh
    /// certificate): `--endpoint`, `--ca`, `--cert`, `--key`.
    ///
    /// # Panics
    /// If the certificate cannot be issued.
    pub fn vmctl_args(&self, identity: &str) -> Vec<String> {
        let (cert, key) = self
            .pki
            .client_files(&self.pki.ca, identity, Validity::days_from_now(1));
        let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        vec![
            "--endpoint".into(),
            format!("tcp://{}", self.tcp_addr()),
            "--ca".into(),
            path(&self.pki.ca_cert()),
            "--cert".into(),
            path(&cert),
            "--key".into(),
            path(&key),
        ]
    }

    /// The `vmctl` command line that reaches this daemon as `identity` (a
    /// fresh certificate) and runs `args`, with no config file in reach.
    pub fn vmctl_argv(&self, identity: &str, args: &[&str]) -> Vec<String> {
        let mut argv = vec![vmctl().display().to_string()];
        argv.extend(self.vmctl_args(identity));
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }

    /// `vmctl` as `identity` running `args`, ready to spawn.
    pub fn vmctl_command(&self, identity: &str, args: &[&str]) -> tokio::process::Command {
        let argv = self.vmctl_argv(identity, args);
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]).env("HOME", "/nonexistent");
        command
    }

    /// Runs `vmctl` as `identity` to the end.
    ///
    /// # Panics
    /// If it cannot be started.
    pub async fn vmctl(&self, identity: &str, args: &[&str]) -> std::process::Output {
        self.vmctl_command(identity, args)
            .output()
            .await
            .expect("vmctl runs")
    }

    /// Runs `vmctl` as `admin` and expects success; returns stdout.
    ///
    /// # Panics
    /// If it fails.
    pub async fn vmctl_ok(&self, args: &[&str]) -> String {
        let out = self.vmctl("admin", args).await;
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.cancel.cancel();
    }

    /// Shuts down gracefully and waits until the server has stopped.
    /// Returns the PKI, for tests that go on using its files.
    ///
    /// # Panics
    /// If the server task panicked.
    pub async fn stop(self) -> TestPki {
        self.cancel.cancel();
        self.task.await.expect("server task ends without panicking");
        self.pki
    }

    /// Whether the server task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// A TLS session to `addr` with the given client config, speaking nothing.
///
/// # Panics
/// If TCP connect fails.
pub async fn raw_session(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let name = rustls_pki_types::ServerName::try_from(vmd_proto::SERVER_NAME).expect("valid name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// A binary of this workspace's build, next to the test executable's
/// directory (`cargo test --workspace` builds `vmd` and `vmctl`).
///
/// # Panics
/// If it has not been built.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so it is built",
        bin.display()
    );
    bin
}

/// The `vmctl` binary.
pub fn vmctl() -> PathBuf {
    workspace_binary("vmctl")
}

/// The `vmd` binary.
pub fn vmd() -> PathBuf {
    workspace_binary("vmd")
}

/// The `dev-admin` client of the development PKI that `vmd serve --dev`
/// made under `dev_dir`.
///
/// # Panics
/// If that PKI has not been made.
pub fn dev_client(dev_dir: &Path) -> ClientTls {
    let pki = dev_dir.join("pki");
    ClientTls::from_files(
        &pki.join("ca.pem"),
        &pki.join("clients/dev-admin.pem"),
        &pki.join("clients/dev-admin.key"),
        vmd_proto::SERVER_NAME,
    )
    .expect("dev PKI was created")
}
