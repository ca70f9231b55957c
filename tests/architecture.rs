//! The shape of the code, checked: the core knows no wire format, nothing
//! in `session/` imports from `training/`, and no hand-written source file
//! is longer than one sitting's read.
//!
//! The core is `src/layers/`, `src/session/`, `src/training/`,
//! `src/optimizers.rs` and the engine (`src/engine.rs`), with what they stand
//! on (`tensor.rs`, `dtype.rs`, `error.rs`, `spec.rs` and `spec/`,
//! `checkpoint.rs`): none may name tonic, prost, the generated code (`pb`,
//! `inference`) or the edges (`api`, `rpc`, `kserve`) outside comments.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const CORE: &[&str] = &[
    "src/layers",
    "src/session",
    "src/training",
    "src/optimizers.rs",
    "src/engine.rs",
    "src/tensor.rs",
    "src/dtype.rs",
    "src/error.rs",
    "src/spec.rs",
    "src/spec",
    "src/checkpoint.rs",
];

/// What a core file may not name.
const TRANSPORT: &[&str] = &[
    "tonic",
    "prost",
    "pb::",
    "inference::",
    "crate::pb",
    "crate::api",
    "crate::rpc",
    "crate::kserve",
    "crate::server",
];

/// The longest a hand-written source file may be.
const MAX_LINES: usize = 600;

/// Every file under `path` (or `path` itself) whose name ends with one of `exts`.
fn files(path: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let skipped = ["target", "build", "node_modules", ".venv"];
    if path.is_dir() {
        if path
            .file_name()
            .is_some_and(|name| skipped.iter().any(|s| name == *s))
        {
            return;
        }
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for entry in entries {
            files(&entry, exts, out);
        }
    } else if exts.iter().any(|ext| path.to_string_lossy().ends_with(ext)) {
        out.push(path.to_path_buf());
    }
}

/// The code of a Rust file: its lines without `//` comments.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let code = line.split("//").next().unwrap_or("");
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

/// `word` stands in `code` as a name (not as part of a longer one).
fn names(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

#[test]
fn the_core_names_no_wire_format_and_no_edge() {
    let mut sources = Vec::new();
    for path in CORE {
        files(&Path::new(ROOT).join(path), &[".rs"], &mut sources);
    }
    assert!(
        sources.len() > 20,
        "found only {} core files",
        sources.len()
    );
    let mut found = Vec::new();
    for file in &sources {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, code) in code_lines(&text) {
            for word in TRANSPORT {
                if names(code, word) {
                    found.push(format!("{}:{line}: {word}", file.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "transport in the core:\n{}",
        found.join("\n")
    );
}

#[test]
fn sessions_import_nothing_from_training() {
    let mut sources = Vec::new();
    files(&Path::new(ROOT).join("src/session"), &[".rs"], &mut sources);
    for file in &sources {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, code) in code_lines(&text) {
            assert!(
                !names(code, "crate::training"),
                "{}:{line}: session/ imports from training/",
                file.display()
            );
        }
    }
}

#[test]
fn no_hand_written_source_file_is_over_600_lines() {
    let mut sources = Vec::new();
    for dir in [
        "src",
        "tests",
        "benches",
        "fuzz/fuzz_targets",
        "bench",
        "examples",
        "clients",
    ] {
        files(
            &Path::new(ROOT).join(dir),
            &[".rs", ".py", ".js", ".sh"],
            &mut sources,
        );
    }
    // Generated: the Python client's stubs (scripts/generate.py writes them).
    sources.retain(|file| !file.to_string_lossy().contains("/layerd/v1/"));
    assert!(
        sources.len() > 50,
        "found only {} source files",
        sources.len()
    );
    let long: Vec<String> = sources
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", file.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_find_what_they_look_for() {
    // Each check would fail on what it forbids.
    let line = "use crate::pb::Tensor; // pb:: in a comment";
    assert!(code_lines(line).any(|(_, code)| names(code, "crate::pb")));
    assert!(!code_lines("// use tonic::Status;").any(|(_, code)| names(code, "tonic")));
    assert!(!names("let ptonic = 1;", "tonic"));
    assert!(names("fn f() -> tonic::Status", "tonic"));
}
