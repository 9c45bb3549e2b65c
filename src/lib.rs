//! nimbus: a declarative reconciler for CI runner fleets.
//!
//! Data flows `config → Desired`, `engine::discovery → Actual`, `core::plan(Desired, Actual, now) → Plan`,
//! then the views (text, JSON, Markdown) or `engine` (apply). Only `cli::commands` builds real clients.

#[macro_use]
pub mod cli;

pub mod api;
pub mod config;
pub mod core;
pub mod engine;
pub mod forges;
pub mod providers;
pub mod sim;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod util;

pub use api::{Nimbus, Storage};
