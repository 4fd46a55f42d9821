//! `vmctl`'s completion scripts and man pages, through the real programs
//! that read them: bash, zsh and fish load the completions (and bash and
//! fish complete a word with them), groff renders the pages. Needs bash,
//! zsh, fish and groff (Debian's zsh, fish and groff-base, in
//! scripts/test's list); a missing one fails.

#![cfg(feature = "system-tests")]

use std::process::Command;

use vmd_tests::vmctl;

#[test]
fn bash_loads_the_completion() {
    let vmctl = vmctl();
    let script = format!(
        "source <({} completions bash) && complete -p vmctl",
        vmctl.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("-F _vmctl vmctl"), "{stdout}");

    // The function completes the subcommands, as bash would on Tab.
    let script = format!(
        "source <({} completions bash) && COMP_WORDS=(vmctl st) COMP_CWORD=1 \
         COMP_LINE='vmctl st' COMP_POINT=8 && _vmctl vmctl st vmctl && echo \"${{COMPREPLY[@]}}\"",
        vmctl.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash runs");
    let words = String::from_utf8_lossy(&out.stdout);
    for word in ["start", "stop"] {
        assert!(words.split_whitespace().any(|w| w == word), "{words}");
    }
}

/// Runs `shell -c script`, which must succeed; its stdout.
fn shell(shell: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(shell)
        .args(args)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("{shell} runs (Debian's {shell} package): {e}"));
    assert!(
        out.status.success(),
        "{shell}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn zsh_loads_the_completion() {
    // -f: no user start-up files; the completion system, then the script,
    // which must register `_vmctl` for vmctl.
    let script = format!(
        "autoload -U compinit && compinit -u -D && source <({} completions zsh) \
         && whence -w _vmctl && print -r -- $_comps[vmctl]",
        vmctl().display()
    );
    let stdout = shell("zsh", &["-f"], &script);
    assert_eq!(stdout, "_vmctl: function\n_vmctl\n");
}

#[test]
fn fish_completes_with_the_completion() {
    let vmctl = vmctl();
    let script = format!(
        "{} completions fish | source; and complete -C 'vmctl st'; and complete -C 'vmctl stop --'",
        vmctl.display()
    );
    let stdout = shell("fish", &["--no-config"], &script);
    let words: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    for word in ["start", "stop", "--force", "--wait"] {
        assert!(words.contains(&word), "{word} missing: {stdout}");
    }
}

#[test]
fn groff_renders_the_man_pages() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = Command::new(vmctl())
        .arg("man")
        .arg(dir.path())
        .output()
        .expect("vmctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let render = |page: &str| {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-P", "-cbou"])
            .arg(dir.path().join(page))
            .output()
            .expect("groff runs (groff-base)");
        assert!(
            out.status.success(),
            "{page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let main = render("vmctl.1");
    for word in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "vmctl-start(1)",
        "vmctl-list(1)",
        "vmctl-watch(1)",
        "Exit codes",
    ] {
        assert!(main.contains(word), "no {word} in vmctl.1:\n{main}");
    }
    assert!(
        !main.contains("completions"),
        "hidden subcommands stay hidden:\n{main}"
    );
    let list = render("vmctl-list.1");
    assert!(list.contains("--all-hosts"), "{list}");
}
