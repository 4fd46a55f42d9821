//! `vmctl`: see and control the VMs of a vmd host.
//!
//! Exit codes: 0 success; 1 the server answered with an error; 2 usage or
//! configuration error; 3 cannot connect (transport, TLS, timeout).

#![forbid(unsafe_code)]

mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmd_client::{
    Client, ClientConfig, ClientError, ClientTls, ConnectOptions, Endpoint, error_chain,
};
use vmd_proto::VmName;

/// See and control the virtual machines of a vmd host.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about)]
struct Args {
    /// Where vmd listens: tcp://HOST:PORT, vsock://CID:PORT or auto
    /// (repeatable; tried in order) [default: from the config file, else
    /// tcp://127.0.0.1:9876].
    #[arg(long, short, global = true, value_parser = Endpoint::parse_list)]
    endpoint: Vec<Vec<Endpoint>>,
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
}

/// A failure and the exit code it maps to.
enum Failure {
    Usage(String),
    Connect(String),
    Server(String),
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
    }
}

/// Config file, then flags on top.
fn settings(args: &Args) -> Result<ClientConfig, Failure> {
    let mut config = if args.dev {
        ClientConfig::dev()
    } else {
        match args.config.clone().or_else(ClientConfig::find) {
            Some(path) => ClientConfig::load(&path).map_err(|e| Failure::Usage(error_chain(&e)))?,
            None => ClientConfig::default(),
        }
    };
    if !args.endpoint.is_empty() {
        config.endpoints = args.endpoint.concat();
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
    Ok(config)
}

async fn run(args: Args) -> Result<(), Failure> {
    let config = settings(&args)?;
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
    };
    let client = Client::connect_any(&config.endpoints, &tls, &options)
        .await
        .map_err(|e| match e {
            ClientError::Refused(_) => Failure::Server(error_chain(&e)),
            e => Failure::Connect(error_chain(&e)),
        })?;
    let fail = |e: ClientError| match e {
        ClientError::Server(_) => Failure::Server(error_chain(&e)),
        e => Failure::Connect(error_chain(&e)),
    };
    let json = args.json;
    let text = match args.command {
        Command::Host => {
            let host = client.host().await.map_err(fail)?;
            output::render(json, &host, output::host)
        }
        Command::List => {
            let vms = client.list_vms().await.map_err(fail)?;
            output::render(json, &vms, |vms| output::vm_table(vms))
        }
        Command::Info { vm } => {
            let info = client.get_vm(&vm).await.map_err(fail)?;
            output::render(json, &info, output::vm_details)
        }
    };
    client.close().await;
    println!(
        "{}",
        text.map_err(|e| Failure::Usage(format!("cannot format output: {e}")))?
    );
    Ok(())
}
