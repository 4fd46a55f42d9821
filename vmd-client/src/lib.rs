//! The vmd client library and the `vmctl` command line tool.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vmd_client::{Client, ClientTls, Endpoint};
//! let tls = ClientTls::from_files(
//!     "ca.pem".as_ref(), "client.pem".as_ref(), "client.key".as_ref(), "vmd")?;
//! let client = Client::connect(&"tcp://127.0.0.1:9876".parse()?, &tls).await?;
//! println!("{}", client.host().await?.hostname);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`endpoint`]: `tcp://`, `vsock://` and `auto` endpoints.
//! - [`tls`]: client TLS configuration from PEM files.
//! - [`client`]: the connection, its driver task and the typed calls.
//! - [`watch`]: following VMs through a chain of `Watch` long-polls.
//! - [`config`]: the `client.toml` file, its named hosts
//!   (`[hosts.NAME]`) and where it is looked up.
//! - [`args`]: the connection flags of every client program (`vmctl`,
//!   `vmd-panel`) and how they go on top of the config file.
//! - `src/bin/vmctl/`: the `vmctl` command line tool: `main.rs` (arguments,
//!   settings, one command per run, several VMs per change), `output.rs`
//!   (tables and JSON), `hosts.rs` (`list --all-hosts`), `watch.rs`,
//!   `top.rs`, `pages.rs` (completions and man pages).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod args;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod tls;
pub mod watch;

pub use args::ConnectArgs;
pub use client::{Client, ClientError, ConnectOptions};
pub use config::ClientConfig;
pub use endpoint::Endpoint;
pub use tls::ClientTls;
pub use vmd_proto as proto;
pub use vmd_proto::error_chain;
pub use watch::Watcher;
