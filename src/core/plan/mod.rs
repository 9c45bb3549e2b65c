//! The planner: a pure function `(Desired, Actual, now) -> Plan`.
//!
//! No async, no I/O, no printing. It decides which machines to create,
//! update in place, replace or destroy; orders the steps as a petgraph DAG;
//! and defers host releases that fall inside the provider's minimum
//! allocation window, saying when they become due. Resources that are not
//! tagged for the desired tenant are invisible to it.

mod build;
pub mod diff;
pub mod document;
pub mod model;
pub mod planfile;

pub use build::plan;
pub use model::*;
