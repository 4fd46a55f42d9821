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

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Args::command(), "vmctl", &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn completions_know_the_subcommands_and_flags() {
        use clap_complete::Shell::{Bash, Fish, Zsh};
        for shell in [Bash, Zsh, Fish] {
            let text = script(shell);
            // fish spells a long flag `-l all-hosts`.
            for word in ["start", "resize", "watch", "all-hosts", "json"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
        // zsh is not on every machine; where it is, the script must parse.
        if let Ok(status) = std::process::Command::new("zsh")
            .args(["-n", "-c", &script(Zsh)])
            .status()
        {
            assert!(status.success(), "zsh -n");
        }
    }

    #[test]
    fn man_pages_name_the_subcommands_and_exit_codes() {
        let mut page = Vec::new();
        clap_mangen::Man::new(Args::command())
            .render(&mut page)
            .expect("renders");
        let page = String::from_utf8(page).expect("UTF-8");
        for word in [
            "vmctl",
            "start",
            "list",
            "watch",
            "Exit codes",
            "all\\-hosts",
        ] {
            assert!(page.contains(word), "no {word} in the page");
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let dir = dir.path();
        assert_eq!(man(Some(dir)), ExitCode::SUCCESS);
        for page in ["vmctl.1", "vmctl-list.1", "vmctl-start.1", "vmctl-stop.1"] {
            assert!(dir.join(page).is_file(), "{page}");
        }
        assert!(!dir.join("vmctl-completions.1").exists(), "hidden");
    }
}
