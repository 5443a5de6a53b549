//! Process titles as `ps` shows them (`mkc: master process -c <conf>`).
//!
//! Linux reads a process's command line from the memory that held its
//! original `argv` strings (and, when the last byte there is not NUL, on
//! into the environment strings that follow). Like nginx, mkc moves the
//! environment to the heap once, then writes the title over that area.
//! [`init`] must run in the master before any thread exists; [`set`] may
//! then be called in the master and in each forked worker.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Start and length of the writable argv+environment area; 0 = unknown.
static AREA_START: AtomicUsize = AtomicUsize::new(0);
static AREA_LEN: AtomicUsize = AtomicUsize::new(0);

/// Fields 48..=51 of /proc/self/stat: arg_start, arg_end, env_start, env_end.
fn stat_area() -> Option<(usize, usize, usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it are
    // counted from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let get = |n: usize| fields.get(n - 3)?.parse::<usize>().ok();
    Some((get(48)?, get(49)?, get(50)?, get(51)?))
}

/// Prepares the area. Single-threaded callers only (it rewrites the
/// environment).
pub fn init() {
    let Some((arg_start, arg_end, env_start, env_end)) = stat_area() else {
        return;
    };
    if arg_start == 0 || arg_end <= arg_start {
        return;
    }
    // The area must hold this process's own command line. Under a program
    // that runs mkc inside its own process (valgrind: `make
    // bench-instructions`), the kernel's area is that program's, and it
    // keeps its options there: overwriting them broke its output files.
    let Some(argv0) = std::env::args_os().next() else {
        return;
    };
    // SAFETY: [arg_start, arg_end) is this process's argv string area as
    // the kernel reports it: mapped, and only read here.
    let area = unsafe { std::slice::from_raw_parts(arg_start as *const u8, arg_end - arg_start) };
    use std::os::unix::ffi::OsStrExt;
    if area.split(|b| *b == 0).next() != Some(argv0.as_bytes()) {
        return;
    }
    let mut end = arg_end;
    if env_start == arg_end && env_end > env_start {
        // Copy the environment to the heap so that getenv no longer reads
        // the area we are about to overwrite.
        let vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
        // SAFETY: called before any other thread exists (documented
        // precondition), so nothing reads the environment concurrently.
        unsafe {
            if libc::clearenv() != 0 {
                return;
            }
            for (k, v) in vars {
                std::env::set_var(k, v);
            }
        }
        end = env_end;
    }
    AREA_START.store(arg_start, Ordering::SeqCst);
    AREA_LEN.store(end - arg_start, Ordering::SeqCst);
}

/// Sets the title; longer titles are cut to the available area.
pub fn set(title: &str) {
    let start = AREA_START.load(Ordering::SeqCst);
    let len = AREA_LEN.load(Ordering::SeqCst);
    if start == 0 || len < 2 {
        return;
    }
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, start+len) is this process's own argv/environment
    // string area as the kernel reports it, writable stack memory that no
    // Rust object refers to any more (std copied argv at startup and init()
    // moved the environment to the heap).
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
    // The short name shown by `top` and in /proc/<pid>/comm.
    if let Ok(name) = std::ffi::CString::new(title.chars().take(15).collect::<String>()) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}
