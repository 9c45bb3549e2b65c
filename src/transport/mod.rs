//! Transports: how nimbus runs a POSIX shell script on a machine. The local
//! sandbox transport and the SSH transport implement the same trait, so
//! setup steps and the on-machine state work the same on both.
//!
//! A script is one shell word handed to `sh -c`; data (a state file) travels
//! on stdin, never on the command line.

pub mod local;
pub mod ssh;

use std::path::Path;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach `{machine}`: {message}")]
    Unreachable { machine: String, message: String },
    #[error("on `{machine}`: {message}")]
    Failed { machine: String, message: String },
    #[error("on `{machine}`: {source}")]
    Io {
        machine: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a finished command returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i32,
    /// Standard output, when it was captured (no log file given).
    pub stdout: Vec<u8>,
    /// The tail of standard error, for error messages.
    pub stderr_tail: String,
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// The machine's name, for messages.
    fn machine(&self) -> &str;

    /// Where the state database lives on the machine (a path the shell understands).
    fn state_path(&self) -> &str;

    /// Runs `script` with `sh -c`, feeding `stdin`. With `log`, stdout and stderr are appended to that
    /// file as they come; otherwise stdout is captured.
    async fn exec(&self, script: &str, stdin: &[u8], log: Option<&Path>) -> Result<ExecOutput, TransportError>;

    /// Forgets what was learnt about the machine's identity (a pinned SSH host key): after a reimage it has
    /// a new one. Nothing to forget for a local sandbox.
    async fn forget_identity(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Ends any connection kept open to the machine (discovery is done with it, or it was replaced). The next
    /// use connects again.
    async fn close(&self) {}

    /// The folder on this computer that a path on the machine is, when the machine is a folder here (a `local`
    /// sandbox): its state bookkeeping (the state database, the setup lock) is then done with file operations of
    /// the same semantics as the shell's, with no process spawned. `None` (the default): only the shell.
    fn local_path(&self, _path: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Checks that the machine answers.
    async fn probe(&self) -> Result<(), TransportError> {
        let out = self.exec("echo nimbus-ok", b"", None).await?;
        if out.code == 0 && out.stdout.starts_with(b"nimbus-ok") {
            Ok(())
        } else {
            Err(TransportError::Unreachable {
                machine: self.machine().into(),
                message: "no answer from the shell".into(),
            })
        }
    }
}

/// Keeps the last `n` bytes of a stream, for error messages.
pub(crate) fn tail(bytes: &[u8], n: usize) -> String {
    let start = bytes.len().saturating_sub(n);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}
