//! Replays, with a plain `cargo test` (no nightly, no cargo-fuzz), every
//! input that once made a fuzz target fail (tests/fuzz-regressions/<target>/)
//! and the committed seed corpus (fuzz/seeds/<target>/), through the same
//! functions the fuzz targets call (fuzz/harness.rs).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        root.join("tests/fuzz-regressions").join(target),
        root.join("fuzz/seeds").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        files.extend(
            entries
                .map(|e| e.expect("directory entry").path())
                .filter(|p| p.is_file()),
        );
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs for {target}");
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let mut failed = Vec::new();
    for file in inputs(target) {
        let data = std::fs::read(&file).expect("read input");
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}

#[test]
fn config() {
    replay("config", harness::config);
}

#[test]
fn envelope() {
    replay("envelope", harness::envelope);
}

#[test]
fn admin_api() {
    replay("admin_api", harness::admin_api);
}

#[test]
fn state_files() {
    replay("state_files", harness::state_files);
}
