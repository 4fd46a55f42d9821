//! The `vmd` binary: parse arguments, build a validated config, run.

#![forbid(unsafe_code)]

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use vmd::cli::{Cli, Command, Serve, ServeArgs};
use vmd::pki::{self, EnsureSpec, PkiLayout};
use vmd::say;

/// How long an idle blocking-pool thread lives (see `main`).
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Pki(cmd) => pki::run_command(cmd).map_err(Into::into),
        Command::CheckConfig(args) => check_config(args),
        Command::Reload { pid } => reload(pid),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmd: {}", vmd_proto::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn Error>> {
    let Serve {
        config,
        dev_pki_dir,
    } = Serve::try_from(args.clone())?;
    vmd::logging::init(&config.log);
    if let Some(dir) = dev_pki_dir {
        let report = pki::ensure(&PkiLayout::new(&dir), &EnsureSpec::dev())?;
        if !report.created.is_empty() {
            info!(dir = %dir.display(), "created the development PKI");
        }
        warn!(
            "development mode: certificates under {} are for testing only",
            dir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // zbus connects and closes its unix sockets on the blocking pool;
        // an idle pool thread would otherwise wake to exit after 10 s.
        // Parked threads cost no CPU, so they stay.
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()?;
    runtime.block_on(async {
        // Handlers go in before anything binds, so a SIGTERM right after
        // start-up still shuts down gracefully.
        let shutdown = shutdown_signal()?;
        let mut hangup = signal(SignalKind::hangup())?;
        let server = match vmd::Server::bind(&config).await {
            Ok(server) => server,
            Err(e @ vmd::ServerError::Tls(_)) => {
                return Err(format!(
                    "{}\n(hint: create certificates with `vmd pki ensure --dir {}`, or try `vmd serve --dev`)",
                    vmd_proto::error_chain(&e),
                    config.tls.ca.parent().unwrap_or(std::path::Path::new(".")).display()
                )
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        // Every listener is bound: systemd may start what depends on vmd.
        vmd::notify::ready();
        let handle = server.handle();
        // SIGHUP: re-read the config (certificates, CRLs, policy) and swap
        // it in; a broken file leaves the running configuration in place.
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                info!("SIGHUP received: reloading");
                vmd::notify::reloading();
                let reloaded = Serve::try_from(args.clone())
                    .map_err(Box::<dyn Error>::from)
                    .and_then(|serve| Ok(handle.reload(&serve.config)?));
                if let Err(e) = reloaded {
                    error!(error = %vmd_proto::error_chain(e.as_ref()), "reload failed; keeping the running configuration");
                }
                // Serving either way: the old configuration stays on failure.
                vmd::notify::ready();
            }
        });
        server
            .run(async {
                shutdown.await;
                vmd::notify::stopping();
            })
            .await;
        Ok(())
    })
}

fn check_config(args: ServeArgs) -> Result<(), Box<dyn Error>> {
    let Serve { config, .. } = Serve::try_from(args)?;
    vmd::tls::server_config(&config.tls)?;
    // The inventory is read on every request; a broken one would fail them
    // all, so a check that passes must have read it too.
    let vms = config.vms.inventory.load()?;
    say!("configuration is valid");
    for addr in &config.tcp {
        say!("  listen tcp://{addr}");
    }
    if let Some(vsock) = config.vsock {
        say!("  listen vsock://any:{}", vsock.port);
    }
    say!("  ca   {}", config.tls.ca.display());
    say!("  cert {}", config.tls.cert.display());
    let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    match &config.vms.inventory.file {
        Some(file) => say!(
            "  inventory {} + {}: {names:?}",
            file.display(),
            config.vms.inventory.state_dir.display()
        ),
        None => say!(
            "  inventory {}: {names:?}",
            config.vms.inventory.state_dir.display()
        ),
    }
    Ok(())
}

/// Sends SIGHUP to the daemon (`vmd reload`).
fn reload(pid: Option<u32>) -> Result<(), Box<dyn Error>> {
    let pid = match pid {
        Some(pid) => pid,
        None => match vmd::cli::find_daemons(std::path::Path::new("/proc")).as_slice() {
            [pid] => *pid,
            [] => return Err("no running `vmd serve` found (give --pid)".into()),
            many => {
                return Err(format!("several `vmd serve` processes ({many:?}): give --pid").into());
            }
        },
    };
    // `kill(1)` rather than a raw syscall: this crate forbids unsafe code.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    if !status.success() {
        return Err(format!("could not signal PID {pid}").into());
    }
    say!("asked vmd (PID {pid}) to reload; its log says whether the new configuration was taken");
    Ok(())
}

/// Installs SIGTERM and SIGINT handlers; the future resolves on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}
