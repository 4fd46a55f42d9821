//! `vmctl completions SHELL` and `vmctl man [DIR]`: generated from the
//! clap definitions, so they always match the flags vmctl takes.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use crate::Args;

/// Prints the completion script for `shell` to stdout.
pub(crate) fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Args::command(), "vmctl", &mut out);
    write_stdout(&out)
}

/// Writes `vmctl.1` to stdout, or `vmctl.1` and a page per visible
/// subcommand (`vmctl-list.1`, …) into `dir`.
pub(crate) fn man(dir: Option<&Path>) -> ExitCode {
    let command = Args::command();
    match dir {
        None => {
            let mut out = Vec::new();
            if let Err(e) = clap_mangen::Man::new(command).render(&mut out) {
                eprintln!("vmctl: cannot render the man page: {e}");
                return ExitCode::from(1);
            }
            write_stdout(&out)
        }
        Some(dir) => match clap_mangen::generate_to(command, dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmctl: cannot write man pages into {}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmctl: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}
