//! nimbus: a declarative reconciler for CI runner fleets.
//!
//! Data flows `config → Desired`, `discovery → Actual`, `plan(Desired, Actual, now) → Plan`,
//! then `render` (text, JSON, Markdown) or `exec` (apply). Only `commands` builds real clients.

pub mod config;
pub mod model;
pub mod plan;
pub mod render;
pub mod discovery;
pub mod providers;
pub mod cli;
pub mod commands;
pub mod diagnostics;
#[doc(hidden)]
pub mod testkit;
