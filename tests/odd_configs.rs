//! `mkc -t -c FILE` on every file of tests/odd-configs/ (empty, binary
//! garbage, NUL bytes, invalid UTF-8, huge lines, unterminated quotes,
//! module files that are missing, a directory, the file itself, numbers
//! that overflow, ...) and on a few special paths: it never panics, exits
//! 0 (valid) or 1 (invalid, the documented code of `-t`), and every error
//! names a file, with its line when the error is about one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `mkc -t -c conf`; returns (exit code, stderr).
fn check(conf: &Path) -> (i32, String) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mkc"))
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .env("NO_COLOR", "1")
        .output()
        .expect("run mkc");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "{}: mkc -t killed by a signal ({:?})\nstderr:\n{stderr}",
            conf.display(),
            out.status
        )
    });
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "{}: mkc -t panicked:\n{stderr}",
        conf.display()
    );
    assert!(
        code == 0 || code == 1,
        "{}: exit code {code}, expected 0 or 1\nstderr:\n{stderr}",
        conf.display()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{}: mkc -t took {:?}",
        conf.display(),
        started.elapsed()
    );
    (code, stderr)
}

fn odd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/odd-configs")
}

/// The `mkc: error: ...` lines of `stderr`.
fn errors(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("mkc: error: "))
        .collect()
}

/// `text` holds `NAME:LINE:` for a file named NAME.
fn names_line(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(at, _)| {
        let rest = &text[at + name.len()..];
        rest.strip_prefix(':').is_some_and(|r| {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && r[digits..].starts_with(':')
        })
    })
}

#[test]
fn odd_config_files_never_panic_and_errors_name_file_and_line() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(odd_dir())
        .expect("tests/odd-configs")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "odd configs: {files:?}");
    for conf in &files {
        let name = conf.file_name().unwrap().to_str().unwrap().to_string();
        let (code, stderr) = check(conf);
        if name == "valid.conf" || name == "bom-crlf.conf" {
            assert_eq!(code, 0, "{name} is valid:\n{stderr}");
            continue;
        }
        if name == "only-comments.conf" || name == "empty.conf" {
            assert_eq!(code, 1, "{name} has no topic:\n{stderr}");
        }
        if code == 0 {
            continue;
        }
        let errors = errors(&stderr);
        assert!(
            !errors.is_empty(),
            "{name}: exit 1 without an error:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "configuration file {} test failed",
                conf.display()
            )),
            "{name}: no verdict:\n{stderr}"
        );
        // Every error names the file it is about: server.conf or a module
        // file (both are under odd-configs/, or the module path written).
        for e in &errors {
            assert!(
                e.contains("odd-configs") || e.contains(".conf"),
                "{name}: error names no file: {e}"
            );
        }
    }
}

/// Errors about a line say `file:line`.
#[test]
fn line_errors_name_file_and_line() {
    let cases = [
        ("unterminated-quote.conf", "unterminated-quote.conf"),
        ("nul-bytes.conf", "nul-bytes.conf"),
        ("invalid-utf8.conf", "invalid-utf8.conf"),
        ("numbers-overflow.conf", "numbers-overflow.conf"),
        ("numbers-overflow.conf", "overflow.conf"),
        ("keys-without-values.conf", "keys-without-values.conf"),
        ("unknown-keys.conf", "unknown-keys.conf"),
        ("module-missing.conf", "module-missing.conf"),
        ("module-garbage.conf", "garbage.conf"),
        ("module-self.conf", "module-self.conf"),
        ("huge-key.conf", "huge-key.conf"),
    ];
    for (file, named) in cases {
        let (code, stderr) = check(&odd_dir().join(file));
        assert_eq!(code, 1, "{file} is invalid:\n{stderr}");
        assert!(
            errors(&stderr).iter().any(|e| names_line(e, named)),
            "{file}: no error names {named}:LINE:\n{stderr}"
        );
    }
}

/// Paths that are not regular files: errors, not hangs or panics.
#[test]
fn special_paths_are_errors() {
    let dir = odd_dir();
    for path in [
        dir.join("does-not-exist.conf"),
        dir.join("modules"),
        PathBuf::from("/dev/null"),
        PathBuf::from("/dev/zero"),
        PathBuf::from("/"),
    ] {
        let (code, stderr) = check(&path);
        assert_eq!(code, 1, "{}:\n{stderr}", path.display());
    }
}

/// A module file that is /dev/zero (or any endless file) is refused, not
/// read until memory runs out.
#[test]
fn endless_module_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        "brokers 127.0.0.1:9092\ntopic orders\nmodule /dev/zero\n",
    )
    .unwrap();
    let (code, stderr) = check(&conf);
    assert_eq!(code, 1, "{stderr}");
    assert!(names_line(&stderr, "server.conf"), "{stderr}");
}
