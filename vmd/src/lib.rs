//! vmd: the VM information-and-control daemon of a Ghaf KVM host.
//!
//! Clients (the GUI VM's panel over AF_VSOCK, admins over TCP) connect over
//! TLS 1.3 with a mandatory client certificate, speak the `vmd-proto`
//! protocol, and get host facts and VM information on request.
//!
//! # Layout
//!
//! A request flows socket → server modules → [`vms`] (reads answer from
//! the live model; changes become operations) → [`drivers`]; events flow
//! the other way, [`drivers`] → [`vms::model`] → pending watches. Nothing
//! in [`drivers`] knows about clients, and nothing in the server modules
//! knows about QMP or D-Bus.
//!
//! Serving clients:
//! - [`server`]: binds listeners, accept loops, connection cap, shutdown.
//! - [`transport`]: TCP and AF_VSOCK listeners behind one trait; peers.
//! - [`tls`]: the rustls server config and peer identity from certificates.
//! - [`connection`]: one connection: handshake, `Hello`, pipelined requests.
//! - [`handler`]: the routing `match` from request to answer; error mapping.
//! - [`policy`]: identities, roles, scopes, transport and vsock binding.
//! - [`audit`]: the audit log of changes and denials.
//! - [`usage`]: per-identity connection cap and request rate.
//! - [`metrics`]: the metrics listener: OpenMetrics over HTTPS, the
//!   series, and vmd's own counters.
//!
//! The VMs ([`vms`]):
//! - [`vms::inventory`]: the VMs the host declares (microvm.nix, inventory file).
//! - [`vms::model`]: the live record of every declared VM and its generation.
//! - [`vms::follow`]: keeps the model current from systemd's signals and
//!   vmd's own hypervisor monitors.
//! - [`vms::change`]: changes: validation against the model, running them.
//! - [`vms::ops`]: operations, busy semantics, waiting.
//! - [`vms::watch`]: change generations, what `Watch` waits on.
//!
//! Where facts come from and changes go ([`drivers`]):
//! - [`drivers::systemd`]: units over D-Bus: state, signals, jobs, freeze.
//! - [`drivers::qemu`]: QMP: vmd's own monitor, short sessions on the
//!   shared socket, vCPU hot-plug, balloon.
//! - [`drivers::cgroup`]: CPU time and memory use, read on request.
//!
//! The rest:
//! - [`cli`]: the `vmd` command line; flags override the config file.
//! - [`config`]: the TOML config file, validation, defaults.
//! - [`host`]: the host probe (KVM via `kvm-ioctls`, `/proc`).
//! - [`pki`]: the CA and certificates (`vmd pki …`), rcgen.
//! - [`logging`]: `tracing` output, plain or JSON.
//! - [`notify`]: readiness, reload and stop messages to systemd (`sd_notify`).

#![forbid(unsafe_code)]

/// `println!` for the command line's output that does not panic when
/// stdout is closed early (`vmd pki show | head -1`): what the reader left
/// unread is its choice, not an error of ours.
#[macro_export]
macro_rules! say {
    () => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

pub mod audit;
pub mod cli;
pub mod config;
pub mod connection;
pub mod drivers;
pub mod handler;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod policy;
pub mod server;
mod slots;
pub mod tls;
pub mod transport;
pub mod usage;
pub mod vms;

pub use config::Config;
pub use server::{Server, ServerError, ServerHandle, run};
