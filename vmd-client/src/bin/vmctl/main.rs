//! `vmctl`: see and control the VMs of a vmd host, or of several.
//!
//! Exit codes: see [`EXIT_CODES`].

#![forbid(unsafe_code)]

mod hosts;
mod output;
mod pages;
mod top;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use futures_util::future::join_all;
use vmd_client::{
    Client, ClientConfig, ClientError, ClientTls, ConnectArgs, ConnectOptions, error_chain,
};
use vmd_proto::{Bytes, OperationId, OperationInfo, OperationStatus, VmName};

/// vmctl's exit codes, also shown by `--help` and in the man page.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the server answered with an error, or a change failed (for several
     VMs: any of them)
  2  usage or configuration error
  3  cannot connect (transport, TLS, timeout)
  4  list --all-hosts: some host did not answer (its row says why)";

/// See and control the virtual machines of vmd hosts.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, after_help = EXIT_CODES)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Say on stderr which endpoints failed and which one answered.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Ask the named host of the config file (`[hosts.NAME]`): its
    /// endpoints, and its CA, certificate, key and server name where it
    /// sets them.
    #[arg(long, short = 'H', global = true, value_name = "NAME")]
    host: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Host capabilities and resources.
    Host,
    /// The VMs you may see.
    List {
        /// Ask every host of the config file (`[hosts.NAME]`) at once and
        /// print one table with a HOST column; a host that does not answer
        /// within the timeout is a row (STATE unreachable, or error) and
        /// makes the exit code 4.
        #[arg(long)]
        all_hosts: bool,
    },
    /// One VM in detail.
    Info {
        /// The VM's name.
        vm: VmName,
    },
    /// Start stopped VMs.
    ///
    /// Each VM's outcome is printed on its own line.
    Start {
        /// The VMs' names.
        #[arg(required = true, value_name = "VM")]
        vms: Vec<VmName>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Shut running VMs down (gracefully, through their units' stop).
    ///
    /// Each VM's outcome is printed on its own line.
    Stop {
        /// The VMs' names.
        #[arg(required = true, value_name = "VM")]
        vms: Vec<VmName>,
        /// Kill it instead (admin only).
        #[arg(long)]
        force: bool,
        /// Seconds the graceful stop may take.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u32>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Restart VMs.
    ///
    /// Each VM's outcome is printed on its own line.
    Restart {
        /// The VMs' names.
        #[arg(required = true, value_name = "VM")]
        vms: Vec<VmName>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Pause running VMs' vCPUs.
    ///
    /// Each VM's outcome is printed on its own line.
    Pause {
        /// The VMs' names.
        #[arg(required = true, value_name = "VM")]
        vms: Vec<VmName>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Resume paused VMs.
    ///
    /// Each VM's outcome is printed on its own line.
    Resume {
        /// The VMs' names.
        #[arg(required = true, value_name = "VM")]
        vms: Vec<VmName>,
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
    /// Who the server says you are, your role, and the VMs you may change.
    Whoami,
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
    /// Print a shell completion script (bash, zsh, fish, …) to stdout.
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages: vmctl.1 to stdout, or vmctl.1 and one page per
    /// subcommand (vmctl-list.1, …) into DIR.
    #[command(hide = true)]
    Man {
        /// Where to write the pages.
        dir: Option<PathBuf>,
    },
}

/// `--wait`: block until the operations end.
#[derive(Debug, clap::Args)]
struct Wait {
    /// Wait until the operations end; exit 1 if any failed.
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
    match &args.command {
        Command::Completions { shell } => return pages::completions(*shell),
        Command::Man { dir } => return pages::man(dir.as_deref()),
        _ => {}
    }
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

/// Exit code 4: `list --all-hosts` printed its table, and some host did
/// not answer.
const SOME_HOST_SILENT: u8 = 4;

/// Config file, then `--host`, then flags on top; also names the file
/// used, if any.
fn settings(args: &Args) -> Result<(ClientConfig, Option<PathBuf>), Failure> {
    let (config, file) = config_file(args)?;
    let mut config = match &args.host {
        Some(name) => config
            .for_host(name)
            .map_err(|e| Failure::Usage(with_file(&e, file.as_deref())))?,
        None => config,
    };
    apply_flags(&mut config, args)?;
    Ok((config, file))
}

/// An error about the config, naming the file it came from.
fn with_file(err: &dyn std::error::Error, file: Option<&std::path::Path>) -> String {
    match file {
        Some(path) => format!("{}: {}", path.display(), error_chain(err)),
        None => format!("{} (no config file)", error_chain(err)),
    }
}

/// The config file (or the built-in defaults, or `--dev`'s).
fn config_file(args: &Args) -> Result<(ClientConfig, Option<PathBuf>), Failure> {
    if args.connect.dev && args.host.is_some() {
        return Err(Failure::Usage(
            "--host names a host of the config file; --dev uses none".into(),
        ));
    }
    args.connect
        .config_file()
        .map_err(|e| Failure::Usage(error_chain(&e)))
}

/// The flags on top of the settings.
fn apply_flags(config: &mut ClientConfig, args: &Args) -> Result<(), Failure> {
    args.connect
        .apply(config)
        .map_err(|e| Failure::Usage(e.to_string()))
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
            "hosts": config.hosts.keys().collect::<Vec<_>>(),
        });
        println!("{value:#}");
    } else {
        println!("{}", output::config(&source, &endpoints, config));
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    if let Command::List { all_hosts: true } = args.command {
        return hosts::list_all(&args).await;
    }
    let (config, file) = settings(&args)?;
    if matches!(args.command, Command::Config) {
        show_config(&config, file.as_deref(), args.json);
        return Ok(());
    }
    let client = connect(&config, &args).await?;
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
        Command::Whoami => {
            let rights = client.rights().await.map_err(fail)?;
            println!("{}", render(output::render(json, &rights, output::rights))?);
            client.close().await;
            return Ok(());
        }
        Command::List { .. } => {
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
        Command::Start { vms, wait } => {
            return change_each(client, &vms, wait, json, Change::Start).await;
        }
        Command::Stop {
            vms,
            force,
            timeout,
            wait,
        } => {
            let change = Change::Stop { force, timeout };
            return change_each(client, &vms, wait, json, change).await;
        }
        Command::Restart { vms, wait } => {
            return change_each(client, &vms, wait, json, Change::Restart).await;
        }
        Command::Pause { vms, wait } => {
            return change_each(client, &vms, wait, json, Change::Pause).await;
        }
        Command::Resume { vms, wait } => {
            return change_each(client, &vms, wait, json, Change::Resume).await;
        }
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
        Command::Config | Command::Completions { .. } | Command::Man { .. } => return Ok(()),
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

/// The TLS files of `config`, loaded.
fn load_tls(config: &ClientConfig, hint: &str) -> Result<ClientTls, Failure> {
    ClientTls::from_files(&config.ca, &config.cert, &config.key, &config.server_name)
        .map_err(|e| Failure::Usage(format!("{}{hint}", error_chain(&e))))
}

/// vmctl's connection options under `config`.
fn connect_options(config: &ClientConfig) -> ConnectOptions {
    ConnectOptions {
        timeout: config.connect_timeout,
        client_name: format!("vmctl/{}", env!("CARGO_PKG_VERSION")),
        ..ConnectOptions::default()
    }
}

/// Connects as `config` says, reporting on stderr with `--verbose`.
async fn connect(config: &ClientConfig, args: &Args) -> Result<Client, Failure> {
    let tls = load_tls(config, args.connect.tls_hint())?;
    let options = connect_options(config);
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
    Ok(client)
}

/// A change that start, stop, restart, pause and resume make to each VM
/// they name.
#[derive(Clone, Copy, Debug)]
enum Change {
    Start,
    Stop { force: bool, timeout: Option<u32> },
    Restart,
    Pause,
    Resume,
}

impl Change {
    async fn ask(self, client: &Client, vm: &VmName) -> Result<OperationInfo, ClientError> {
        match self {
            Self::Start => client.start(vm).await,
            Self::Stop { force, timeout } => client.shutdown(vm, force, timeout).await,
            Self::Restart => client.restart(vm).await,
            Self::Pause => client.pause(vm).await,
            Self::Resume => client.resume(vm).await,
        }
    }
}

/// Asks for `change` on each VM in turn, then (with `--wait`) waits for
/// every accepted operation at once. Each VM's outcome is one line: the
/// operation on stdout (one JSON document each with `--json`), or the
/// server's refusal on stderr. Exit 1 if any VM was refused or its change
/// failed; a lost connection ends everything with exit 3.
async fn change_each(
    client: Client,
    vms: &[VmName],
    wait: Wait,
    json: bool,
    change: Change,
) -> Result<(), Failure> {
    let mut any_failed = false;
    let mut accepted = Vec::new();
    for vm in vms {
        match change.ask(&client, vm).await {
            Ok(op) if wait.wait => accepted.push(op),
            Ok(op) => print_operation(&op, json)?,
            Err(e @ ClientError::Server(_)) => {
                any_failed = true;
                eprintln!("vmctl: {vm}: {}", error_chain(&e));
            }
            Err(e) => return Err(Failure::Connect(error_chain(&e))),
        }
    }
    let ended = join_all(accepted.into_iter().map(|op| wait_for(&client, op))).await;
    for op in ended {
        let op = op.map_err(|e| match e {
            ClientError::Server(_) => Failure::Server(error_chain(&e)),
            e => Failure::Connect(error_chain(&e)),
        })?;
        print_operation(&op, json)?;
        any_failed |= matches!(op.status, OperationStatus::Failed(_));
    }
    client.close().await;
    if any_failed {
        return Err(Failure::Silent(1));
    }
    Ok(())
}

/// One operation on stdout.
fn print_operation(op: &OperationInfo, json: bool) -> Result<(), Failure> {
    let text = output::render(json, op, output::operation)
        .map_err(|e| Failure::Usage(format!("cannot format output: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Waits (in `WaitOperation` rounds, no polling) until `op` ends.
async fn wait_for(client: &Client, mut op: OperationInfo) -> Result<OperationInfo, ClientError> {
    while op.status == OperationStatus::Running {
        op = client.wait_operation(op.id, 60_000).await?;
    }
    Ok(op)
}
