//! `docs/threat-model.md` names the test behind each mitigation; this
//! checks that every named test exists, so the document cannot silently
//! drift from the code.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file of the workspace sources and tests.
fn sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![
        root().join("vmd/src"),
        root().join("vmd-proto/src"),
        root().join("tests/tests"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source file");
                out.push((path, text));
            }
        }
    }
    out
}

/// The `a::b::c` names in backticks in the "proven by" column.
fn referenced_tests(doc: &str) -> Vec<String> {
    doc.lines()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| l.rsplit('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|name| name.contains("::"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_test_the_threat_model_names_exists() {
    let doc =
        std::fs::read_to_string(root().join("docs/threat-model.md")).expect("docs/threat-model.md");
    let names = referenced_tests(&doc);
    assert!(
        names.len() >= 30,
        "the threat model should name its tests; found {names:?}"
    );
    let sources = sources();
    let mut missing = Vec::new();
    for name in &names {
        let (scope, test) = name.rsplit_once("::").expect("has ::");
        let file = scope.split("::").last().expect("non-empty");
        // `file::*`: the test file or module exists.
        let file_exists = sources.iter().any(|(p, _)| {
            p.file_stem().is_some_and(|s| s == file)
                || p.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|d| d == file)
        });
        let found = if test == "*" {
            file_exists
        } else {
            let needle = format!("fn {test}(");
            sources.iter().any(|(_, text)| text.contains(&needle))
        };
        if !found {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "the threat model names tests that do not exist: {missing:?}"
    );
}
