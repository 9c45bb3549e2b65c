//! State: the journal (runs, actions, events), the apply lock, and the on-machine state database.

pub mod journal;
pub mod lock;
pub mod machine_db;
pub mod remote;
