//! nimbus: a declarative reconciler for CI runner fleets.
//!
//! Data flows `config → Desired`, `discovery → Actual`, `plan(Desired, Actual, now) → Plan`,
//! then `render` (text, JSON, Markdown) or `exec` (apply). Only `commands` builds real clients.

#[macro_use]
pub mod printer;

pub mod apply;
pub mod cli;
pub mod commands;
pub mod config;
pub mod diagnostics;
pub mod discovery;
pub mod exec;
pub mod forge;
pub mod journal;
pub mod machine_state;
pub mod model;
pub mod plan;
pub mod providers;
pub mod render;
pub mod secrets;
pub mod shell;
pub mod telemetry;
#[doc(hidden)]
pub mod testkit;
pub mod transport;
