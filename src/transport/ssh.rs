//! The SSH transport (russh), the same trait as the local one.
//!
//! - Authenticates with a private key (from `{file:}` or `{env:}`) or, without
//!   one, with ssh-agent.
//! - Verifies host keys against `known_hosts`. A host seen for the first time
//!   is pinned: its key is recorded there. A changed key is refused.
//! - Reaches machines directly, through `proxy_command` (OpenSSH tokens `%h`
//!   `%p` `%r` `%%`, each substituted shell-quoted; e.g. SSM Session Manager),
//!   or through a jump host (a direct-tcpip channel).
//! - Runs `sh -c '<script>'`; data goes on stdin; stdout/stderr stream to the
//!   action's log file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::io::AsyncWriteExt;

use super::{ExecOutput, Transport, TransportError, tail};
use crate::util::shell::quote;

/// Where the state database lives on real machines.
pub const REMOTE_STATE_PATH: &str = "/var/lib/nimbus/state.db";

/// How to authenticate.
#[derive(Clone)]
pub enum SshAuth {
    Key(Arc<PrivateKey>),
    Agent,
}

impl std::fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        match self {
            SshAuth::Key(_) => f.write_str("SshAuth::Key(<redacted>)"),
            SshAuth::Agent => f.write_str("SshAuth::Agent"),
        }
    }
}

/// A jump host, `user@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl JumpHost {
    pub fn parse(s: &str, default_user: &str) -> Option<JumpHost> {
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) => (u.to_string(), r),
            None => (default_user.to_string(), s),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (rest.to_string(), 22),
        };
        (!host.is_empty() && !user.is_empty()).then_some(JumpHost { user, host, port })
    }
}

#[derive(Debug, Clone)]
pub struct SshSettings {
    pub user: String,
    pub port: u16,
    pub auth: SshAuth,
    pub known_hosts: PathBuf,
    pub proxy_command: Option<String>,
    pub jump: Option<JumpHost>,
    pub connect_timeout: Duration,
    /// Path of the state database on machines; `{machine}` becomes the machine's name.
    pub state_path: String,
    /// Record the host key of a machine seen for the first time. Off for `plan` (read-only: it never writes
    /// known_hosts) and with `ssh.host_key_policy: require-known`; then an unknown key is refused.
    pub pin_new_keys: bool,
    /// Variables of nimbus's environment `proxy_command` gets besides the minimal ones (`ssh.env_passthrough`).
    pub env_passthrough: Vec<String>,
}

/// Expands OpenSSH's `%h %p %r %%` tokens, quoting each value for the shell.
pub fn expand_proxy_command(template: &str, host: &str, port: u16, user: &str) -> String {
    let mut out = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(&quote(host)),
            Some('p') => out.push_str(&port.to_string()),
            Some('r') => out.push_str(&quote(user)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Serialises writes to known_hosts files across connections.
static PIN_LOCK: Mutex<()> = Mutex::new(());

/// Verifies the server's host key against known_hosts, pinning it on first contact.
struct Verifier {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    pin_new_keys: bool,
    problem: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.problem.lock().expect("lock") = Some("host certificates are not supported".into());
            return Ok(false);
        };
        let _guard = PIN_LOCK.lock().expect("lock");
        let known = if self.known_hosts.exists() {
            russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts)
        } else {
            Ok(false)
        };
        match known {
            Ok(true) => Ok(true),
            Ok(false) if !self.pin_new_keys => {
                *self.problem.lock().expect("lock") = Some(format!(
                    "the host key of `{}` is not known yet (not in `{}`); `nimbus apply` records it on first contact (`ssh.host_key_policy: pin-on-first-apply`), `plan` never does",
                    self.host,
                    self.known_hosts.display()
                ));
                Ok(false)
            }
            Ok(false) => {
                // First contact: pin the key.
                match russh::keys::known_hosts::learn_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
                    Ok(()) => {
                        tracing::info!(event = "nimbus.ssh.host_key_pinned", host = %self.host, port = self.port, fingerprint = %key.fingerprint(Default::default()), "pinned host key of {}", self.host);
                        Ok(true)
                    }
                    Err(e) => {
                        *self.problem.lock().expect("lock") =
                            Some(format!("cannot record the host key in `{}`: {e}", self.known_hosts.display()));
                        Ok(false)
                    }
                }
            }
            Err(russh::keys::Error::KeyChanged { line }) => {
                *self.problem.lock().expect("lock") = Some(format!(
                    "the host key of `{}` changed (it differs from `{}` line {line}); refusing to connect. If the machine was rebuilt, remove that line",
                    self.host,
                    self.known_hosts.display()
                ));
                Ok(false)
            }
            Err(e) => {
                *self.problem.lock().expect("lock") =
                    Some(format!("cannot read `{}`: {e}", self.known_hosts.display()));
                Ok(false)
            }
        }
    }
}

fn config() -> Arc<client::Config> {
    Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: Some(Duration::from_secs(600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Default::default()
    })
}

/// Opens SSH connections and keeps one per machine.
pub struct SshConnector {
    settings: SshSettings,
    sessions: tokio::sync::Mutex<HashMap<String, Arc<Handle<Verifier>>>>,
}

impl SshConnector {
    pub fn new(settings: SshSettings) -> Arc<Self> {
        Arc::new(SshConnector { settings, sessions: tokio::sync::Mutex::new(HashMap::new()) })
    }

    pub fn settings(&self) -> &SshSettings {
        &self.settings
    }

    /// How many connections are open (cached for reuse).
    pub async fn open_sessions(&self) -> usize {
        self.sessions.lock().await.values().filter(|h| !h.is_closed()).count()
    }

    /// A transport to `host` (an address, or what `%h` becomes in the proxy command).
    pub fn transport(self: &Arc<Self>, machine: &str, host: &str) -> Arc<dyn Transport> {
        self.transport_pinned_as(machine, host, host)
    }

    /// A transport to `host` whose host key is pinned (and whose session is cached) under `pin_as`: the
    /// provider's instance id where it has one, so a new machine that reuses an old one's address is not
    /// refused for the old key, and a replaced machine never gets its predecessor's session.
    pub fn transport_pinned_as(self: &Arc<Self>, machine: &str, host: &str, pin_as: &str) -> Arc<dyn Transport> {
        Arc::new(SshTransport {
            connector: self.clone(),
            machine: machine.to_string(),
            host: host.to_string(),
            pin_as: pin_as.to_string(),
            state_path: self.settings.state_path.replace("{machine}", machine),
        })
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<Verifier>,
        user: &str,
        machine: &str,
    ) -> Result<(), TransportError> {
        let fail = |m: String| TransportError::Unreachable { machine: machine.to_string(), message: m };
        let ok = match &self.settings.auth {
            SshAuth::Key(key) => {
                let hash = handle.best_supported_rsa_hash().await.map_err(|e| fail(e.to_string()))?.flatten();
                handle
                    .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .success()
            }
            SshAuth::Agent => {
                let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                    .await
                    .map_err(|e| fail(format!("no ssh key configured and no ssh-agent: {e}")))?;
                let ids = agent.request_identities().await.map_err(|e| fail(format!("ssh-agent: {e}")))?;
                let mut ok = false;
                for id in ids {
                    if let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id {
                        let hash = handle.best_supported_rsa_hash().await.map_err(|e| fail(e.to_string()))?.flatten();
                        if handle
                            .authenticate_publickey_with(user, key, hash, &mut agent)
                            .await
                            .map_err(|e| fail(format!("ssh-agent: {e}")))?
                            .success()
                        {
                            ok = true;
                            break;
                        }
                    }
                }
                ok
            }
        };
        if ok { Ok(()) } else { Err(fail(format!("authentication as `{user}` failed"))) }
    }

    async fn handshake<S>(
        &self,
        stream: S,
        host: &str,
        port: u16,
        user: &str,
        machine: &str,
    ) -> Result<Handle<Verifier>, TransportError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let problem = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            host: host.to_string(),
            port,
            known_hosts: self.settings.known_hosts.clone(),
            pin_new_keys: self.settings.pin_new_keys,
            problem: problem.clone(),
        };
        let mut handle = client::connect_stream(config(), stream, verifier).await.map_err(|e| {
            let why = problem.lock().expect("lock").take().unwrap_or_else(|| e.to_string());
            TransportError::Unreachable { machine: machine.to_string(), message: why }
        })?;
        self.authenticate(&mut handle, user, machine).await?;
        Ok(handle)
    }

    async fn connect(&self, machine: &str, host: &str, pin_as: &str) -> Result<Handle<Verifier>, TransportError> {
        let s = &self.settings;
        let unreachable = |m: String| TransportError::Unreachable { machine: machine.to_string(), message: m };
        let fut = async {
            if let Some(template) = &s.proxy_command {
                let cmd = expand_proxy_command(template, host, s.port, &s.user);
                let mut proxy = tokio::process::Command::new("sh");
                crate::util::shell::minimal_env(&mut proxy, &s.env_passthrough);
                let mut child = proxy
                    .arg("-c")
                    .arg(&cmd)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| unreachable(format!("proxy_command: {e}")))?;
                let stream = tokio::io::join(child.stdout.take().expect("piped"), child.stdin.take().expect("piped"));
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                self.handshake(stream, pin_as, s.port, &s.user, machine).await
            } else if let Some(j) = &s.jump {
                let tcp = tokio::net::TcpStream::connect((j.host.as_str(), j.port))
                    .await
                    .map_err(|e| unreachable(format!("jump host {}:{}: {e}", j.host, j.port)))?;
                let _ = tcp.set_nodelay(true);
                let jump = self.handshake(tcp, &j.host, j.port, &j.user, machine).await?;
                let channel = jump
                    .channel_open_direct_tcpip(host, u32::from(s.port), "127.0.0.1", 0)
                    .await
                    .map_err(|e| unreachable(format!("jump host could not open {host}:{}: {e}", s.port)))?;
                let handle = self.handshake(channel.into_stream(), pin_as, s.port, &s.user, machine).await?;
                // Keep the jump session alive as long as the process runs.
                std::mem::forget(jump);
                Ok(handle)
            } else {
                let tcp = tokio::net::TcpStream::connect((host, s.port))
                    .await
                    .map_err(|e| unreachable(format!("{host}:{}: {e}", s.port)))?;
                let _ = tcp.set_nodelay(true);
                self.handshake(tcp, pin_as, s.port, &s.user, machine).await
            }
        };
        tokio::time::timeout(s.connect_timeout, fut)
            .await
            .map_err(|_| unreachable(format!("no SSH answer within {}s", s.connect_timeout.as_secs())))?
    }

    async fn session(&self, machine: &str, host: &str, pin_as: &str) -> Result<Arc<Handle<Verifier>>, TransportError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(h) = sessions.get(pin_as)
            && !h.is_closed()
        {
            return Ok(h.clone());
        }
        crate::util::telemetry::seed_event("nimbus.ssh.connect_start", None, machine, None, None);
        let t = std::time::Instant::now();
        let h = match self.connect(machine, host, pin_as).await {
            Ok(h) => {
                crate::util::telemetry::seed_event(
                    "nimbus.ssh.connect_success",
                    None,
                    machine,
                    Some(t.elapsed()),
                    None,
                );
                Arc::new(h)
            }
            Err(e) => {
                let msg = e.to_string();
                crate::util::telemetry::seed_event(
                    "nimbus.ssh.connect_failure",
                    None,
                    machine,
                    Some(t.elapsed()),
                    Some(&msg),
                );
                return Err(e);
            }
        };
        sessions.insert(pin_as.to_string(), h.clone());
        Ok(h)
    }
}

pub struct SshTransport {
    connector: Arc<SshConnector>,
    machine: String,
    host: String,
    state_path: String,
    /// The name its host key is pinned under (and its session cached by).
    pin_as: String,
}

#[async_trait]
impl Transport for SshTransport {
    fn machine(&self) -> &str {
        &self.machine
    }

    fn state_path(&self) -> &str {
        &self.state_path
    }

    async fn close(&self) {
        let h = self.connector.sessions.lock().await.remove(&self.pin_as);
        if let Some(h) = h {
            let _ = h.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        }
    }

    /// Drops the cached session and the pinned key of this machine's host: the next contact pins its new one.
    async fn forget_identity(&self) -> Result<(), TransportError> {
        self.connector.sessions.lock().await.remove(&self.pin_as);
        let path = &self.connector.settings.known_hosts;
        let _guard = PIN_LOCK.lock().expect("pin lock");
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(TransportError::Io { machine: self.machine.clone(), source }),
        };
        let port = self.connector.settings.port;
        let names = [self.pin_as.clone(), format!("[{}]:{port}", self.pin_as)];
        let kept: String = text
            .lines()
            .filter(|l| {
                let hosts = l.split_whitespace().next().unwrap_or("");
                !hosts.split(',').any(|h| names.iter().any(|n| n == h))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(|source| TransportError::Io { machine: self.machine.clone(), source })?;
        tracing::info!(event = "nimbus.ssh.host_key_forgotten", machine = %self.machine, "forgot the pinned host key");
        Ok(())
    }

    async fn exec(&self, script: &str, stdin: &[u8], log: Option<&Path>) -> Result<ExecOutput, TransportError> {
        use crate::util::telemetry::seed_event;
        seed_event("nimbus.ssh.command_start", None, &self.machine, None, None);
        let t = std::time::Instant::now();
        let r = self.exec_inner(script, stdin, log).await;
        match &r {
            // A command that ran and exited is a success of SSH's, whatever its exit code.
            Ok(_) => seed_event("nimbus.ssh.command_success", None, &self.machine, Some(t.elapsed()), None),
            Err(e) => {
                seed_event("nimbus.ssh.command_failure", None, &self.machine, Some(t.elapsed()), Some(&e.to_string()))
            }
        }
        r
    }
}

impl SshTransport {
    async fn exec_inner(&self, script: &str, stdin: &[u8], log: Option<&Path>) -> Result<ExecOutput, TransportError> {
        let failed = |m: String| TransportError::Failed { machine: self.machine.clone(), message: m };
        let session = self.connector.session(&self.machine, &self.host, &self.pin_as).await?;
        let mut channel = session.channel_open_session().await.map_err(|e| failed(format!("open channel: {e}")))?;
        channel.exec(true, format!("sh -c {}", quote(script))).await.map_err(|e| failed(format!("exec: {e}")))?;
        if !stdin.is_empty() {
            channel.data(stdin).await.map_err(|e| failed(format!("send stdin: {e}")))?;
        }
        channel.eof().await.map_err(|e| failed(format!("send eof: {e}")))?;
        let mut log_file = match log {
            Some(p) => Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .await
                    .map_err(|e| TransportError::Io { machine: self.machine.clone(), source: e })?,
            ),
            None => None,
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut code = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => match log_file.as_mut() {
                    Some(f) => {
                        let _ = f.write_all(&data).await;
                        stderr.extend_from_slice(&data);
                    }
                    None => stdout.extend_from_slice(&data),
                },
                ChannelMsg::ExtendedData { data, .. } => {
                    if let Some(f) = log_file.as_mut() {
                        let _ = f.write_all(&data).await;
                    }
                    stderr.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status as i32),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    return Err(failed(format!("command killed by signal {signal_name:?}")));
                }
                _ => {}
            }
            if stderr.len() > 64 * 1024 {
                stderr.drain(..stderr.len() - 8 * 1024);
            }
        }
        if let Some(f) = log_file.as_mut() {
            let _ = f.flush().await;
        }
        let code = code.ok_or_else(|| failed("the connection closed before the command finished".into()))?;
        Ok(ExecOutput { code, stdout, stderr_tail: tail(&stderr, 400) })
    }
}
