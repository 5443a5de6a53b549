//! The `mkc` binary: everything lives in the library; see `mkc::cli`.

fn main() -> std::process::ExitCode {
    mkc::cli::run()
}
