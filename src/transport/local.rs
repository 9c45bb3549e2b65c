//! The local transport: runs `sh -c` in a sandbox folder on this computer.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{ExecOutput, Transport, TransportError, tail};

pub struct LocalTransport {
    machine: String,
    root: PathBuf,
    /// Variables of nimbus's environment its steps get besides the minimal ones (`env_passthrough`).
    passthrough: Vec<String>,
}

/// The state database's path inside a local sandbox's root.
pub const LOCAL_STATE_PATH: &str = "var/lib/nimbus/state.db";

impl LocalTransport {
    /// `root` is the sandbox's file system root; scripts run there.
    pub fn new(machine: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        LocalTransport { machine: machine.into(), root: root.into(), passthrough: Vec::new() }
    }

    /// Lets these variables of nimbus's environment through to the steps.
    pub fn with_passthrough(mut self, names: Vec<String>) -> Self {
        self.passthrough = names;
        self
    }

    fn io(&self, source: std::io::Error) -> TransportError {
        TransportError::Io { machine: self.machine.clone(), source }
    }
}

#[async_trait]
impl Transport for LocalTransport {
    fn machine(&self) -> &str {
        &self.machine
    }

    fn state_path(&self) -> &str {
        LOCAL_STATE_PATH
    }

    /// A sandbox path is a path under its root (an absolute one too: the sandbox is its own `/`). `None` once the
    /// sandbox is gone, so that nothing recreates it (the shell then says it is unreachable).
    fn local_path(&self, path: &str) -> Option<PathBuf> {
        self.root.is_dir().then(|| self.root.join(path.trim_start_matches('/')))
    }

    /// A sandbox answers when its root exists: nothing to spawn.
    async fn probe(&self) -> Result<(), TransportError> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(TransportError::Unreachable {
                machine: self.machine.clone(),
                message: format!("sandbox `{}` does not exist", self.root.display()),
            })
        }
    }

    async fn exec(&self, script: &str, stdin: &[u8], log: Option<&Path>) -> Result<ExecOutput, TransportError> {
        if !self.root.is_dir() {
            return Err(TransportError::Unreachable {
                machine: self.machine.clone(),
                message: format!("sandbox `{}` does not exist", self.root.display()),
            });
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).current_dir(&self.root).stdin(Stdio::piped()).kill_on_drop(true);
        // Its own process group, as sshd gives each command its own session: a stuck step can be killed whole.
        cmd.process_group(0);
        crate::util::shell::minimal_env(&mut cmd, &self.passthrough);
        cmd.env("HOME", &self.root);
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| self.io(e))?;
                let f2 = f.try_clone().map_err(|e| self.io(e))?;
                cmd.stdout(Stdio::from(f)).stderr(Stdio::from(f2));
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let mut child = cmd.spawn().map_err(|e| self.io(e))?;
        let mut input = child.stdin.take().expect("stdin piped");
        let data = stdin.to_vec();
        let writer = tokio::spawn(async move {
            let _ = input.write_all(&data).await;
            drop(input);
        });
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let (mut so, mut se) = (child.stdout.take(), child.stderr.take());
        let read_out = async {
            if let Some(s) = so.as_mut() {
                let _ = s.read_to_end(&mut stdout).await;
            }
        };
        let read_err = async {
            if let Some(s) = se.as_mut() {
                let _ = s.read_to_end(&mut stderr).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await.map_err(|e| self.io(e))?;
        let _ = writer.await;
        let stderr_tail = match log {
            Some(p) => std::fs::read(p).map(|b| tail(&b, 400)).unwrap_or_default(),
            None => tail(&stderr, 400),
        };
        Ok(ExecOutput { code: status.code().unwrap_or(-1), stdout, stderr_tail })
    }
}
