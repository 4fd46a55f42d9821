//! `vmctl`: see and control the VMs of a vmd host.
//!
//! Exit codes: 0 success; 1 the server answered with an error; 2 usage or
//! configuration error; 3 cannot connect (transport, TLS, timeout).

#![forbid(unsafe_code)]

mod output;
mod top;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use vmd_client::{
    Client, ClientConfig, ClientError, ClientTls, ConnectOptions, Endpoint, error_chain,
};
use vmd_proto::{Bytes, OperationId, OperationInfo, OperationStatus, VmName};

/// See and control the virtual machines of a vmd host.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about)]
struct Args {
    /// Where vmd listens: tcp://HOST:PORT, vsock://CID:PORT,
    /// hvsock:///PATH:PORT or auto (vsock to the host, then the config's
    /// auto_tcp, else loopback); repeatable, tried in order [default: from
    /// the config file, else tcp://127.0.0.1:9876].
    #[arg(long, short, global = true, value_parser = check_endpoint)]
    endpoint: Vec<String>,
    /// Say on stderr which endpoints failed and which one answered.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Client config file [default: $XDG_CONFIG_HOME/vmd/client.toml, then /etc/vmd/client.toml].
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Use the development daemon of `vmd serve --dev` and its dev-admin certificate.
    #[arg(long, global = true, conflicts_with = "config")]
    dev: bool,
    /// CA certificate (PEM).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// The name the server certificate must carry.
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Bound on each connection step, in milliseconds.
    #[arg(long, global = true)]
    timeout_ms: Option<u64>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Host capabilities and resources.
    Host,
    /// The VMs you may see.
    List,
    /// One VM in detail.
    Info {
        /// The VM's name.
        vm: VmName,
    },
    /// Start a stopped VM.
    Start {
        /// The VM's name.
        vm: VmName,
        #[command(flatten)]
        wait: Wait,
    },
    /// Shut a running VM down (gracefully, through its unit's stop).
    Stop {
        /// The VM's name.
        vm: VmName,
        /// Kill it instead (admin only).
        #[arg(long)]
        force: bool,
        /// Seconds the graceful stop may take.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u32>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Restart a VM.
    Restart {
        /// The VM's name.
        vm: VmName,
        #[command(flatten)]
        wait: Wait,
    },
    /// Pause a running VM's vCPUs.
    Pause {
        /// The VM's name.
        vm: VmName,
        #[command(flatten)]
        wait: Wait,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's name.
        vm: VmName,
        #[command(flatten)]
        wait: Wait,
    },
    /// Change a running VM's vCPUs and/or memory target (admin only).
    Resize {
        /// The VM's name.
        vm: VmName,
        /// Online vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Guest memory target, e.g. 512M or 2G (via the balloon).
        #[arg(long)]
        memory: Option<Bytes>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show the settings vmctl would use (config file, then flags),
    /// without connecting or reading the certificates.
    Config,
    /// Print VM changes as they happen, the VMs' current state first: one
    /// line per VM (one JSON object per line with --json: the VM's info, or
    /// `{"name": …, "removed": true}`). Runs until interrupted.
    Watch {
        /// Only these VMs [default: every VM you may see].
        vms: Vec<VmName>,
        /// Exit after N lines of changes; the current state printed first
        /// does not count (0: print the current state and exit).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// A live view of every VM you may see, updated as they change.
    /// Keys: up/down select, s start, x stop, r restart, q quit.
    Top,
    /// Show an operation (`op-7` or `7`).
    Op {
        /// The operation id.
        id: OperationId,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `--wait`: block until the operation ends.
#[derive(Debug, clap::Args)]
struct Wait {
    /// Wait until the operation ends; exit 1 if it failed.
    #[arg(long)]
    wait: bool,
}

/// A failure and the exit code it maps to.
enum Failure {
    Usage(String),
    Connect(String),
    Server(String),
    /// Already reported on stdout (a failed operation): just the exit code.
    Silent(u8),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmctl: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Server(msg)) => {
            eprintln!("vmctl: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("vmctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Connect(msg)) => {
            eprintln!("vmctl: {msg}");
            ExitCode::from(3)
        }
        Err(Failure::Silent(code)) => ExitCode::from(code),
    }
}

/// Checks an `--endpoint` value at parse time; `auto` is expanded once
/// the config (and its `auto_tcp`) is known.
fn check_endpoint(text: &str) -> Result<String, vmd_client::endpoint::EndpointError> {
    Endpoint::parse_list(text).map(|_| text.to_owned())
}

/// Config file, then flags on top; also names the file used, if any.
fn settings(args: &Args) -> Result<(ClientConfig, Option<PathBuf>), Failure> {
    let (mut config, file) = if args.dev {
        (ClientConfig::dev(), None)
    } else {
        match args.config.clone().or_else(ClientConfig::find) {
            Some(path) => (
                ClientConfig::load(&path).map_err(|e| Failure::Usage(error_chain(&e)))?,
                Some(path),
            ),
            None => (ClientConfig::default(), None),
        }
    };
    if !args.endpoint.is_empty() {
        let mut endpoints = Vec::new();
        for text in &args.endpoint {
            let list = Endpoint::parse_list_via(text, &config.auto_tcp)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            endpoints.extend(list);
        }
        config.endpoints = endpoints;
    }
    let set = |slot: &mut PathBuf, flag: &Option<PathBuf>| {
        if let Some(v) = flag {
            slot.clone_from(v);
        }
    };
    set(&mut config.ca, &args.ca);
    set(&mut config.cert, &args.cert);
    set(&mut config.key, &args.key);
    if let Some(name) = &args.server_name {
        config.server_name.clone_from(name);
    }
    if let Some(ms) = args.timeout_ms {
        config.connect_timeout = Duration::from_millis(ms);
    }
    Ok((config, file))
}

/// `vmctl config`: the effective settings.
fn show_config(config: &ClientConfig, file: Option<&std::path::Path>, json: bool) {
    let endpoints: Vec<String> = config.endpoints.iter().map(ToString::to_string).collect();
    let source = file.map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    if json {
        let value = serde_json::json!({
            "file": file,
            "endpoints": endpoints,
            "auto_tcp": config.auto_tcp.to_string(),
            "ca": config.ca,
            "cert": config.cert,
            "key": config.key,
            "server_name": config.server_name,
            "connect_timeout_ms": config.connect_timeout.as_millis(),
        });
        println!("{value:#}");
    } else {
        println!("{}", output::config(&source, &endpoints, config));
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let (config, file) = settings(&args)?;
    if matches!(args.command, Command::Config) {
        show_config(&config, file.as_deref(), args.json);
        return Ok(());
    }
    let tls = ClientTls::from_files(&config.ca, &config.cert, &config.key, &config.server_name)
        .map_err(|e| {
            let hint = if args.dev {
                " (is `vmd serve --dev` running or has it run once?)"
            } else {
                ""
            };
            Failure::Usage(format!("{}{hint}", error_chain(&e)))
        })?;
    let options = ConnectOptions {
        timeout: config.connect_timeout,
        client_name: format!("vmctl/{}", env!("CARGO_PKG_VERSION")),
        ..ConnectOptions::default()
    };
    let started = Instant::now();
    let verbose = args.verbose;
    let client = Client::connect_any_reporting(&config.endpoints, &tls, &options, |at, e| {
        if verbose {
            eprintln!(
                "vmctl: {at} failed after {} ms: {}",
                started.elapsed().as_millis(),
                error_chain(e)
            );
        }
    })
    .await
    .map_err(|e| match e {
        ClientError::Refused(_) => Failure::Server(error_chain(&e)),
        e => Failure::Connect(error_chain(&e)),
    })?;
    if verbose {
        eprintln!(
            "vmctl: connected to {} in {} ms",
            client.endpoint(),
            started.elapsed().as_millis()
        );
    }
    if client.welcome().role.is_none() {
        // vmd closes such a session after its Welcome: say why, not "closed".
        return Err(Failure::Server(format!(
            "the server grants this certificate ({}) no rights",
            client.welcome().identity
        )));
    }
    let fail = |e: ClientError| match e {
        ClientError::Server(_) => Failure::Server(error_chain(&e)),
        e => Failure::Connect(error_chain(&e)),
    };
    let json = args.json;
    let render = |text: Result<String, serde_json::Error>| {
        text.map_err(|e| Failure::Usage(format!("cannot format output: {e}")))
    };
    let (op, wait) = match args.command {
        Command::Host => {
            let host = client.host().await.map_err(fail)?;
            println!("{}", render(output::render(json, &host, output::host))?);
            client.close().await;
            return Ok(());
        }
        Command::List => {
            let vms = client.list_vms().await.map_err(fail)?;
            println!(
                "{}",
                render(output::render(json, &vms, |vms| output::vm_table(vms)))?
            );
            client.close().await;
            return Ok(());
        }
        Command::Info { vm } => {
            let info = client.get_vm(&vm).await.map_err(fail)?;
            println!(
                "{}",
                render(output::render(json, &info, output::vm_details))?
            );
            client.close().await;
            return Ok(());
        }
        Command::Watch { vms, count } => {
            let args = watch::WatchArgs { vms, count, json };
            let result = watch::run(&client, args, fail).await;
            client.close().await;
            return result;
        }
        Command::Top => {
            let result = top::run(&client).await;
            client.close().await;
            return result;
        }
        Command::Start { vm, wait } => (client.start(&vm).await, wait),
        Command::Stop {
            vm,
            force,
            timeout,
            wait,
        } => (client.shutdown(&vm, force, timeout).await, wait),
        Command::Restart { vm, wait } => (client.restart(&vm).await, wait),
        Command::Pause { vm, wait } => (client.pause(&vm).await, wait),
        Command::Resume { vm, wait } => (client.resume(&vm).await, wait),
        Command::Resize {
            vm,
            vcpus,
            memory,
            wait,
        } => {
            if vcpus.is_none() && memory.is_none() {
                return Err(Failure::Usage(
                    "resize needs --vcpus, --memory or both".into(),
                ));
            }
            (client.resize(&vm, vcpus, memory).await, wait)
        }
        Command::Op { id, wait } => (client.get_operation(id).await, wait),
        Command::Config => return Ok(()),
    };
    let mut op = op.map_err(fail)?;
    if wait.wait {
        op = wait_for(&client, op).await.map_err(fail)?;
    }
    println!("{}", render(output::render(json, &op, output::operation))?);
    client.close().await;
    if matches!(op.status, OperationStatus::Failed(_)) {
        return Err(Failure::Silent(1));
    }
    Ok(())
}

/// Waits (in `WaitOperation` rounds, no polling) until `op` ends.
async fn wait_for(client: &Client, mut op: OperationInfo) -> Result<OperationInfo, ClientError> {
    while op.status == OperationStatus::Running {
        op = client.wait_operation(op.id, 60_000).await?;
    }
    Ok(op)
}
