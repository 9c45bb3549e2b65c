//! The command line: argument parsing ([`args`]), commands (thin: parse → engine → view), views, the
//! error type rendered once with miette, and the printer.

#[macro_use]
pub mod printer;

pub mod args;
pub mod commands;
pub mod error;
pub mod views;

pub use args::*;
pub use commands::run;
