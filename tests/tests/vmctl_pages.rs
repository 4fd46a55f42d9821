//! `vmctl`'s completion scripts and man pages, through the real programs
//! that read them: bash loads the completion, groff renders the pages.
//! Needs bash and groff (Debian's groff-base, in scripts/test's list); a
//! missing one fails.

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
