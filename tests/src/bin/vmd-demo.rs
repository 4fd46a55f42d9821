//! `vmd-demo`: a demo host in one command (as root). systemd in
//! systemd-nspawn runs four microvm.nix-shaped QEMU VMs, and the real
//! `vmd` serves them in development mode on 127.0.0.1:9876 with the
//! development PKI of `$VMD_DEV_DIR` (or its default), so `vmctl --dev
//! list`, `vmctl --dev top` and the panel show real VMs. Ctrl-C (SIGINT),
//! SIGTERM or SIGHUP stop it and remove everything it made.
//!
//! ```text
//! vmd-demo [--vmd PATH]     # default: the vmd next to this binary
//! ```
//!
//! `scripts/demo` builds it with `vmd` and `vmctl` and runs it. See
//! [`vmd_tests::demo`] for the steps.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: vmd-demo [--vmd PATH]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut vmd = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vmd")))
        .unwrap_or_else(|| PathBuf::from("vmd"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--vmd", Some(path)) => vmd = path.into(),
            ("-h" | "--help", _) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match vmd_tests::demo::run(vmd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmd-demo: {}", vmd_proto::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
