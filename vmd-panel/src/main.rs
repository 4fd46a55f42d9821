//! `vmd-panel`: the GUI VM's desktop panel for vmd (see the library's
//! docs). Parses the command line, builds the settings, opens the window.
//!
//! Exit codes: 0 the window was closed; 2 usage or configuration error
//! (the message says which file or flag).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gtk::prelude::*;
use gtk::{gio, glib};
use gtk4 as gtk;
use vmd_client::{ClientConfig, ClientTls, Endpoint, error_chain};
use vmd_panel::{link, ui};

/// The GTK application id.
const APP_ID: &str = "org.ghaf.VmdPanel";

/// A desktop panel for the VMs of a vmd host.
#[derive(Debug, Parser)]
#[command(name = "vmd-panel", version, about)]
struct Args {
    /// Where vmd listens: tcp://HOST:PORT, vsock://CID:PORT,
    /// hvsock:///PATH:PORT or auto (vsock to the host, then the config's
    /// auto_tcp); repeatable, tried in order [default: from the config
    /// file, else tcp://127.0.0.1:9876].
    #[arg(long, short, value_parser = check_endpoint)]
    endpoint: Vec<String>,
    /// Client config file [default: $XDG_CONFIG_HOME/vmd/client.toml, then /etc/vmd/client.toml].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Use the development daemon of `vmd serve --dev` and its dev-admin certificate.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The name the server certificate must carry.
    #[arg(long)]
    server_name: Option<String>,
    /// Bound on each connection step, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

/// Checks an `--endpoint` value at parse time; `auto` is expanded once
/// the config (and its `auto_tcp`) is known.
fn check_endpoint(text: &str) -> Result<String, vmd_client::endpoint::EndpointError> {
    Endpoint::parse_list(text).map(|_| text.to_owned())
}

/// The config file (or `--dev`'s), then flags on top, then the TLS files.
fn settings(args: &Args) -> Result<link::Settings, String> {
    let mut config = if args.dev {
        ClientConfig::dev()
    } else {
        match args.config.clone().or_else(ClientConfig::find) {
            Some(path) => ClientConfig::load(&path).map_err(|e| error_chain(&e))?,
            None => ClientConfig::default(),
        }
    };
    if !args.endpoint.is_empty() {
        let mut endpoints = Vec::new();
        for text in &args.endpoint {
            let list =
                Endpoint::parse_list_via(text, &config.auto_tcp).map_err(|e| e.to_string())?;
            endpoints.extend(list);
        }
        config.endpoints = endpoints;
    }
    for (slot, flag) in [
        (&mut config.ca, &args.ca),
        (&mut config.cert, &args.cert),
        (&mut config.key, &args.key),
    ] {
        if let Some(v) = flag {
            slot.clone_from(v);
        }
    }
    if let Some(name) = &args.server_name {
        config.server_name.clone_from(name);
    }
    if let Some(ms) = args.timeout_ms {
        config.connect_timeout = Duration::from_millis(ms);
    }
    let tls = ClientTls::from_files(&config.ca, &config.cert, &config.key, &config.server_name)
        .map_err(|e| {
            let hint = if args.dev {
                " (is `vmd serve --dev` running or has it run once?)"
            } else {
                ""
            };
            format!("{}{hint}", error_chain(&e))
        })?;
    Ok(link::Settings { config, tls })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("vmd-panel: {msg}");
            return ExitCode::from(2);
        }
    };
    glib::set_prgname(Some("vmd-panel"));
    glib::set_application_name("vmd-panel");
    let app = gtk::Application::builder()
        .application_id(APP_ID)
        .flags(gio::ApplicationFlags::NON_UNIQUE)
        .build();
    let (to_link, link_rx) = async_channel::unbounded();
    let (link_tx, from_link) = async_channel::unbounded();
    if let Err(e) = link::spawn(settings, link_tx, link_rx) {
        eprintln!("vmd-panel: cannot start the connection thread: {e}");
        return ExitCode::from(2);
    }
    app.connect_activate(move |app| ui::build(app, to_link.clone(), from_link.clone()));
    // GTK must not see our flags: they were parsed above.
    let code = app.run_with_args(&["vmd-panel"]);
    // The connection thread ends with the process.
    if code == glib::ExitCode::SUCCESS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
