//! Small shared pieces: shell quoting, secrets, time, telemetry setup.

pub mod failpoint;
pub mod secrets;
pub mod shell;
pub mod telemetry;
pub mod text;
pub mod time;
