//! The pure core: the machine model (desired and actual) and the planner. No I/O, no async, no vendor names.

pub mod cost;
pub mod model;
pub mod names;
pub mod plan;
pub mod scale;
pub mod tagset;
