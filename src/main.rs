//! The `nimbus` binary: parses arguments and hands over to [`nimbus::cli::commands`].

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than the C library's allocator: a plan of a large fleet is mostly small allocations, where
/// glibc's malloc spent a third of the time and musl's (the static release builds) more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = nimbus::cli::normalize_args(std::env::args());
    let cli = match nimbus::cli::Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are successes; bad usage is an error (1, not clap's 2, which means "changes").
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    ExitCode::from(nimbus::cli::commands::run(cli))
}
