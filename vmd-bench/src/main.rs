//! `vmd-bench`: measures a vmd over real mTLS, and a vmd process from the
//! outside. It prints numbers; it never judges them (BENCHMARKS.md holds
//! the targets).
//!
//! # Layout
//!
//! - `load`: `requests` (N connections × M pipelined requests, latency
//!   percentiles) and `handshakes` (full or resumed mTLS sessions per
//!   second).
//! - `procfs`: CPU time, context switches and memory of a process from
//!   `/proc`; `idle` and `startup`, which run the `vmd` binary themselves.
//! - `flood`: a refusal flood (forbidden, malformed, rightless sessions)
//!   against the daemon: its CPU and log growth, a good client's latency.
//! - `report`: one result as text or as a JSON line.

#![forbid(unsafe_code)]

mod flood;
mod load;
mod procfs;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmd_client::ClientTls;

/// Measures vmd: request load, handshakes, idle cost, start-up.
#[derive(Debug, Parser)]
#[command(name = "vmd-bench", version, about)]
struct Cli {
    /// Print each result as one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N connections, each keeping M requests in flight, for a duration
    /// or a count; throughput and latency percentiles.
    Requests(RequestsArgs),
    /// Sessions (TCP, mTLS handshake, Hello/Welcome, close) per second.
    Handshakes(HandshakesArgs),
    /// Starts vmd, lets it sit idle with 0, 1 and K clients connected, and
    /// reports CPU time, context switches and memory.
    Idle(IdleArgs),
    /// Starts vmd repeatedly: time from exec until it accepts a TCP
    /// connection, and until it answers a first request.
    Startup(StartupArgs),
    /// Floods a running vmd with refusals from another identity; reports
    /// vmd's CPU, its log growth and a good client's median latency
    /// against unloaded.
    Flood(FloodArgs),
}

/// Where the daemon is and who the bench is.
#[derive(Clone, Debug, Args)]
struct Target {
    /// The daemon's TCP address.
    #[arg(long, default_value = vmd_proto::dev::TCP_ADDR)]
    addr: SocketAddr,
    /// CA certificate [default: the development PKI's].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate [default: the development client's].
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key [default: the development client's].
    #[arg(long)]
    key: Option<PathBuf>,
    /// The daemon's PID: its CPU time during the run is reported per
    /// request (or handshake), which is what this machine's noise affects
    /// least.
    #[arg(long)]
    server_pid: Option<u32>,
}

impl Target {
    fn tls(&self) -> Result<ClientTls, vmd_client::tls::TlsError> {
        let ca = self.ca.clone().unwrap_or_else(vmd_proto::dev::ca_cert);
        let cert = self
            .cert
            .clone()
            .unwrap_or_else(vmd_proto::dev::client_cert);
        let key = self.key.clone().unwrap_or_else(vmd_proto::dev::client_key);
        ClientTls::from_files(&ca, &cert, &key, vmd_proto::SERVER_NAME)
    }
}

/// The request to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// `Host`.
    Host,
    /// `ListVms`.
    List,
    /// `GetVm` of `--vm`.
    Get,
}

#[derive(Debug, Args)]
struct RequestsArgs {
    #[command(flatten)]
    target: Target,
    /// The request.
    #[arg(long, value_enum, default_value_t = Op::Host)]
    op: Op,
    /// The VM of `--op get`.
    #[arg(long, required_if_eq("op", "get"))]
    vm: Option<String>,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, short = 'p', default_value_t = 1)]
    pipeline: usize,
    /// How long to measure, in seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0, conflicts_with = "count")]
    duration: f64,
    /// Stop after this many requests in all instead of after a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Requests before this many seconds are not measured.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
}

#[derive(Debug, Args)]
struct HandshakesArgs {
    #[command(flatten)]
    target: Target,
    /// Sessions opened at once.
    #[arg(long, short = 'c', default_value_t = 2)]
    connections: usize,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Resume sessions with TLS 1.3 tickets (the first session of each
    /// connection slot is a full handshake).
    #[arg(long)]
    resume: bool,
}

/// How to run the daemon.
#[derive(Clone, Debug, Args)]
struct Daemon {
    /// The vmd binary.
    #[arg(long, default_value = "vmd")]
    vmd: PathBuf,
    /// Its config file (TCP listener at `--addr`, an existing PKI).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    daemon: Daemon,
    /// Seconds of each idle window.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Client counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,1000")]
    clients: Vec<usize>,
    /// Then one more window with this many `Watch` requests held open on
    /// one more connection (0: none).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
}

#[derive(Debug, Args)]
struct StartupArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    daemon: Daemon,
    /// Start-ups to time.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

#[derive(Debug, Args)]
struct FloodArgs {
    /// The good client, the daemon's PID (for its CPU).
    #[command(flatten)]
    target: Target,
    /// How the flooders refuse.
    #[arg(long, value_enum, default_value_t = flood::Kind::Forbidden)]
    kind: flood::Kind,
    /// The flooder's certificate (same CA as the good client).
    #[arg(long)]
    flood_cert: PathBuf,
    /// The flooder's key.
    #[arg(long)]
    flood_key: PathBuf,
    /// Flooding connections at once.
    #[arg(long, default_value_t = 4)]
    flooders: usize,
    /// Seconds of each window (unloaded, then flooded).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// vmd's log file, whose growth is measured.
    #[arg(long)]
    log: Option<PathBuf>,
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmd-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(reports) => {
            for r in reports {
                r.print(cli.json);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<Vec<report::Report>, Box<dyn std::error::Error>> {
    Ok(match command {
        Command::Requests(a) => {
            let op = match a.op {
                Op::Host => vmd_proto::Op::Host,
                Op::List => vmd_proto::Op::ListVms,
                Op::Get => vmd_proto::Op::GetVm {
                    name: vmd_proto::VmName::new(a.vm.clone().unwrap_or_default())?,
                },
            };
            let stop = match a.count {
                Some(n) => load::Stop::Count(n),
                None => load::Stop::After(seconds(a.duration)),
            };
            vec![
                load::requests(
                    &a.target,
                    &load::RequestPlan {
                        op,
                        connections: a.connections.max(1),
                        pipeline: a.pipeline.max(1),
                        stop,
                        warmup: seconds(a.warmup),
                    },
                )
                .await?,
            ]
        }
        Command::Handshakes(a) => vec![
            load::handshakes(
                &a.target,
                a.connections.max(1),
                seconds(a.duration),
                a.resume,
            )
            .await?,
        ],
        Command::Idle(a) => {
            procfs::idle(
                &a.target,
                &a.daemon,
                seconds(a.seconds),
                &a.clients,
                a.watchers,
            )
            .await?
        }
        Command::Startup(a) => vec![procfs::startup(&a.target, &a.daemon, a.runs.max(1)).await?],
        Command::Flood(a) => {
            let ca = a.target.ca.clone().unwrap_or_else(vmd_proto::dev::ca_cert);
            let flood_tls =
                ClientTls::from_files(&ca, &a.flood_cert, &a.flood_key, vmd_proto::SERVER_NAME)?;
            vec![
                flood::flood(
                    &a.target,
                    flood::FloodPlan {
                        kind: a.kind,
                        flooders: a.flooders.max(1),
                        duration: seconds(a.duration),
                        flood_tls,
                        log: a.log,
                    },
                )
                .await?,
            ]
        }
    })
}
