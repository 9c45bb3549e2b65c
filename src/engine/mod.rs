//! The engine: discovery (read-only, parallel), the DAG walk with bounded parallelism, and the actions
//! that carry a plan out against providers, forges and machines.

pub mod actions;
pub mod apply;
pub mod clients;
pub mod discovery;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod walk;
