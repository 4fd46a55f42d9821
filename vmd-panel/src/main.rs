//! `vmd-panel`: the GUI VM's desktop panel for vmd (see the library's
//! docs). Parses the command line, builds the settings, opens the window.
//!
//! Exit codes: 0 the window was closed; 2 usage or configuration error
//! (the message says which file or flag).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use gtk::prelude::*;
use gtk::{gio, glib};
use gtk4 as gtk;
use vmd_client::{ClientTls, ConnectArgs, error_chain};
use vmd_panel::{link, ui};

/// The GTK application id.
const APP_ID: &str = "org.ghaf.VmdPanel";

/// A desktop panel for the VMs of a vmd host.
#[derive(Debug, Parser)]
#[command(name = "vmd-panel", version, about)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The config file (or `--dev`'s), then flags on top, then the TLS files.
fn settings(args: &Args) -> Result<link::Settings, String> {
    let (mut config, _file) = args.connect.config_file().map_err(|e| error_chain(&e))?;
    args.connect.apply(&mut config).map_err(|e| e.to_string())?;
    let tls = ClientTls::from_files(&config.ca, &config.cert, &config.key, &config.server_name)
        .map_err(|e| format!("{}{}", error_chain(&e), args.connect.tls_hint()))?;
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
