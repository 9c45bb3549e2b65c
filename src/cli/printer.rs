//! Writing to stdout and stderr without panicking.
//!
//! `println!` panics when its stream is closed (`nimbus plan | head -2`). Every line nimbus prints goes
//! through `outln!`/`out!` (stdout) or `errln!`/`err!` (stderr) instead: a closed pipe ends that
//! stream's output quietly and the command carries on (an apply is never cut short by it) and exits
//! with its own code. `tests/it/local_apply.rs` checks that no other printing macro is used in `src/`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);

fn write(closed: &AtomicBool, w: &mut dyn Write, args: std::fmt::Arguments) {
    if closed.load(Ordering::Relaxed) {
        return;
    }
    if w.write_fmt(args).and_then(|()| w.flush()).is_err() {
        // EPIPE (the reader went away) or any other failure: stop writing to this stream.
        closed.store(true, Ordering::Relaxed);
    }
}

#[doc(hidden)]
pub fn stdout(args: std::fmt::Arguments) {
    write(&STDOUT_CLOSED, &mut std::io::stdout().lock(), args);
}

#[doc(hidden)]
pub fn stderr(args: std::fmt::Arguments) {
    write(&STDERR_CLOSED, &mut std::io::stderr().lock(), args);
}

/// Whether stdout was closed by its reader.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// `print!` that never panics.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::printer::stdout(format_args!($($arg)*)) };
}

/// `println!` that never panics.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::printer::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::printer::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::cli::printer::stderr(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    () => { $crate::cli::printer::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::printer::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}
