//! The server: binds listeners, accepts connections, shuts down gracefully.
//!
//! 1. [`Server::bind`] loads TLS, binds every configured TCP address and
//!    the AF_VSOCK listener (a host without vsock logs it and carries on
//!    with TCP, unless vsock is `required`), and the metrics listener when
//!    configured (see [`crate::metrics`]).
//! 2. [`Server::run`] runs one accept loop per listener. A loop accepts,
//!    gets the connection a slot under the connection cap (evicting the
//!    oldest unfinished handshake, or shedding the new connection: see
//!    `slots`), backs off on accept errors (e.g. `EMFILE`), and spawns the
//!    connection on a task tracker. The metrics listener's loop is the
//!    same loop, under the same cap; only its connections speak HTTP.
//! 3. When `shutdown` resolves, the loops stop accepting, connections stop
//!    reading new requests and answer the ones in flight, and `run` waits
//!    for them up to the shutdown grace period.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::connection::{self, ConnectionContext, Reloadable};
use crate::drivers::qemu::Qmp;
use crate::drivers::systemd::Systemd;
use crate::handler::Handler;
use crate::host::HostProbe;
use crate::metrics::{self, COUNTERS, ListenerKind};
use crate::slots::Slots;
use crate::tls::{self, TlsError};
use crate::transport::{self, ListenAddr, Listener};
use crate::vms::ops::Operations;
use crate::vms::{ChangeDeadlines, VmService};

/// Longest pause after repeated accept errors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The VM inventory cannot be read.
    #[error(transparent)]
    Vms(#[from] crate::vms::VmError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A bound listener of either kind.
#[derive(Debug)]
enum AnyListener {
    Tcp(tokio::net::TcpListener),
    Vsock(tokio_vsock::VsockListener),
    Hybrid(transport::HybridListener),
}

/// A server with its listeners bound, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listeners: Vec<AnyListener>,
    addrs: Vec<ListenAddr>,
    metrics: Option<(tokio::net::TcpListener, std::net::SocketAddr)>,
    ctx: Arc<ConnectionContext>,
}

impl Server {
    /// Loads TLS and binds every configured listener.
    ///
    /// # Errors
    /// [`ServerError`] if TLS material is unusable, no listener is
    /// configured, or a TCP (or required vsock) listener cannot be bound.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        config.check_listeners()?;
        let reloadable = reloadable(config)?;
        let mut vms = VmService::new(
            config.vms.inventory.clone(),
            Arc::new(Systemd::new(config.vms.systemd_bus.clone())),
            Arc::new(Qmp::new(config.vms.qmp_timeout)),
            Operations::new(config.vms.operations),
            ChangeDeadlines::default(),
        );
        if let Some(root) = &config.vms.cgroup_root {
            vms = vms.with_cgroup_root(root.clone());
        }
        // The live model is current before the first client is served (and
        // before systemd hears READY).
        vms.start().await?;

        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for &addr in &config.tcp {
            let listener = transport::bind_tcp(addr)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: format!("tcp://{addr}"),
                    source,
                })?;
            addrs.push(
                Listener::local_addr(&listener).map_err(|source| ServerError::Bind {
                    addr: format!("tcp://{addr}"),
                    source,
                })?,
            );
            listeners.push(AnyListener::Tcp(listener));
        }
        if let Some(vsock) = config.vsock {
            let bound = transport::bind_vsock(vsock.port)
                .and_then(|l| Listener::local_addr(&l).map(|addr| (l, addr)));
            match bound {
                Ok((listener, addr)) => {
                    addrs.push(addr);
                    listeners.push(AnyListener::Vsock(listener));
                }
                Err(source) if vsock.required => {
                    return Err(ServerError::Bind {
                        addr: format!("vsock://any:{}", vsock.port),
                        source,
                    });
                }
                Err(e) => {
                    warn!(port = vsock.port, error = %e, "AF_VSOCK unavailable on this host; serving without it");
                }
            }
        }
        if let Some(port) = config.hybrid_vsock_port {
            // The VMs are read once: a VM declared later needs a restart.
            match vms.hybrid_vsock() {
                Ok(hybrid) => {
                    for (vm, uds) in hybrid {
                        match transport::bind_hybrid(vm.clone(), &uds, port) {
                            Ok(listener) => {
                                addrs.push(Listener::local_addr(&listener).map_err(|source| {
                                    ServerError::Bind {
                                        addr: format!("hvsock://{}", uds.display()),
                                        source,
                                    }
                                })?);
                                listeners.push(AnyListener::Hybrid(listener));
                            }
                            Err(e) => {
                                warn!(%vm, uds = %uds.display(), error = %e, "cannot listen on the VM's hybrid vsock socket");
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the inventory for hybrid vsock sockets"),
            }
        }
        let metrics = match config.metrics {
            Some(addr) => {
                let bind_err = |source| ServerError::Bind {
                    addr: format!("https://{addr} (metrics)"),
                    source,
                };
                let listener = transport::bind_tcp(addr).await.map_err(bind_err)?;
                let local = listener.local_addr().map_err(bind_err)?;
                Some((listener, local))
            }
            None => None,
        };
        if listeners.is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "no listener could be bound".into(),
            }
            .into());
        }
        let handler = Arc::new(
            Handler::new(HostProbe::new(Instant::now()), vms)
                .with_max_watchers(config.limits.identity.max_watchers),
        );
        Ok(Self {
            listeners,
            addrs,
            metrics,
            ctx: Arc::new(ConnectionContext::new(handler, config.limits, reloadable)),
        })
    }

    /// A handle to reload the running server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            ctx: self.ctx.clone(),
        }
    }

    /// The bound addresses (with kernel-chosen ports filled in).
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// The metrics listener's bound address, if it is configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until `shutdown` resolves, then drains (see module docs).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let slots = Slots::new(self.ctx.limits.max_connections);
        let mut loops = tokio::task::JoinSet::new();
        for (listener, addr) in self.listeners.into_iter().zip(self.addrs) {
            info!(%addr, "listening");
            let (ctx, cancel, tracker, slots) = (
                self.ctx.clone(),
                cancel.clone(),
                tracker.clone(),
                slots.clone(),
            );
            let main = ListenerKind::Main;
            match listener {
                AnyListener::Tcp(l) => {
                    loops.spawn(accept_loop(l, main, ctx, slots, tracker, cancel))
                }
                AnyListener::Vsock(l) => {
                    loops.spawn(accept_loop(l, main, ctx, slots, tracker, cancel))
                }
                AnyListener::Hybrid(l) => {
                    loops.spawn(accept_loop(l, main, ctx, slots, tracker, cancel))
                }
            };
        }
        if let Some((listener, addr)) = self.metrics {
            info!(addr = %format_args!("https://{addr}/metrics"), "listening for metrics scrapes");
            loops.spawn(accept_loop(
                listener,
                ListenerKind::Metrics,
                self.ctx.clone(),
                slots.clone(),
                tracker.clone(),
                cancel.clone(),
            ));
        }
        shutdown.await;
        info!("shutting down");
        cancel.cancel();
        while loops.join_next().await.is_some() {}
        tracker.close();
        let grace = self.ctx.limits.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                connections = tracker.len(),
                ?grace,
                "shutdown grace period over; dropping remaining connections"
            );
        }
        info!("stopped");
    }
}

/// Reloads a running server's TLS material and policy (SIGHUP).
#[derive(Clone, Debug)]
pub struct ServerHandle {
    ctx: Arc<ConnectionContext>,
}

impl ServerHandle {
    /// Loads certificates, key, CRLs and policy from `config` and swaps
    /// them in at once for new connections. Listeners and limits are not
    /// reloaded (they need a restart).
    ///
    /// # Errors
    /// [`ServerError`] if the new TLS material is unusable; the old TLS
    /// material and policy then stay in force.
    pub fn reload(&self, config: &Config) -> Result<(), ServerError> {
        let new = reloadable(config)?;
        self.ctx.replace(new);
        // The inventory may have been edited and scopes changed: pending
        // watches answer a fresh snapshot.
        self.ctx.handler.vms_changed();
        info!(
            identities = config.policy.identities.len(),
            crls = config.tls.crls.len(),
            "reloaded certificates, CRLs and policy"
        );
        Ok(())
    }
}

/// TLS material and policy from `config`, checked before use.
fn reloadable(config: &Config) -> Result<Reloadable, ServerError> {
    let server_config = tls::server_config(&config.tls)?;
    let metrics_tls = TlsAcceptor::from(tls::metrics_config(&server_config));
    let tls = TlsAcceptor::from(server_config);
    warn_about_expiry(&config.tls);
    Ok(Reloadable {
        tls,
        metrics_tls,
        policy: config.policy.clone(),
    })
}

/// How far ahead certificate expiry is announced in the log.
const EXPIRY_WARNING_DAYS: u32 = 30;

/// Logs a warning for a server or CA certificate that has expired or
/// expires soon (clients will refuse an expired server certificate).
fn warn_about_expiry(paths: &crate::config::TlsPaths) {
    for (what, path) in [
        ("server certificate", &paths.cert),
        ("CA certificate", &paths.ca),
    ] {
        match crate::pki::CertSummary::from_pem_file(path) {
            Ok(cert) if cert.expires_within(0) => {
                error!(path = %path.display(), not_after = %cert.not_after, "{what} has expired");
            }
            Ok(cert) if cert.expires_within(EXPIRY_WARNING_DAYS) => {
                warn!(path = %path.display(), not_after = %cert.not_after, "{what} expires soon");
            }
            Ok(_) => {}
            Err(e) => warn!(path = %path.display(), error = %e, "cannot read {what} validity"),
        }
    }
}

/// Accepts connections from one listener until cancelled.
async fn accept_loop<L: Listener>(
    listener: L,
    kind: ListenerKind,
    ctx: Arc<ConnectionContext>,
    slots: Arc<Slots>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let Some((permit, handshake)) = slots.admit().await else {
                    drop(stream); // shed: see `slots`
                    continue;
                };
                COUNTERS.connection(kind, &peer);
                let (ctx, cancel) = (ctx.clone(), cancel.clone());
                tracker.spawn(async move {
                    match kind {
                        ListenerKind::Main => {
                            connection::serve(stream, peer, ctx, cancel, handshake).await;
                        }
                        ListenerKind::Metrics => {
                            metrics::http::serve(stream, peer, ctx, cancel, handshake).await;
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                error!(error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Binds and serves `config` until `shutdown` resolves.
///
/// # Errors
/// As [`Server::bind`].
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await;
    Ok(())
}
