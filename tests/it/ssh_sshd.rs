//! The SSH transport against a real OpenSSH sshd on 127.0.0.1: commands and
//! their output, the on-machine state over SSH, host-key pinning and refusal
//! of a changed key, proxy_command tokens, a jump host, and hostile values.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::peer;
use nimbus::core::model::StepStatus;
use nimbus::state::machine_db::{self, StateDb};
use nimbus::transport::ssh::{JumpHost, SshAuth, SshConnector, SshSettings, expand_proxy_command};

struct Sshd {
    port: u16,
    key: String,
    user: String,
}

fn sshd() -> Option<Sshd> {
    let url = peer("NIMBUS_SSHD_URL", "sshd")?;
    Some(Sshd {
        port: url.rsplit(':').next().unwrap().parse().unwrap(),
        key: std::env::var("NIMBUS_SSHD_KEY").expect("NIMBUS_SSHD_KEY"),
        user: std::env::var("NIMBUS_SSHD_USER").expect("NIMBUS_SSHD_USER"),
    })
}

fn settings(s: &Sshd, dir: &Path) -> SshSettings {
    let key = russh::keys::load_secret_key(&s.key, None).unwrap();
    SshSettings {
        user: s.user.clone(),
        port: s.port,
        auth: SshAuth::Key(Arc::new(key)),
        known_hosts: dir.join("known_hosts"),
        proxy_command: None,
        jump: None,
        connect_timeout: Duration::from_secs(10),
        state_path: dir.join("machines/{machine}/state.db").display().to_string(),
        pin_new_keys: true,
        env_passthrough: Vec::new(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn runs_commands_and_pins_the_host_key() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = SshConnector::new(settings(&s, dir.path()));
    let t = c.transport("m1", "127.0.0.1");
    rt().block_on(async {
        let out = t.exec("echo out; echo err >&2; exit 3", b"", None).await.unwrap();
        assert_eq!(out.code, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr_tail, "err");
        let out = t.exec("cat", b"from stdin", None).await.unwrap();
        assert_eq!(out.stdout, b"from stdin");
        // Output streams to a log file.
        let log = dir.path().join("step.log");
        let out = t.exec("echo one; echo two >&2", b"", Some(&log)).await.unwrap();
        assert_eq!(out.code, 0);
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("one") && logged.contains("two"), "{logged}");
    });
    let pinned = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
    let host_pub = std::fs::read_to_string(std::env::var("NIMBUS_SSHD_HOST_KEY").unwrap()).unwrap();
    let key_b64 = host_pub.split_whitespace().nth(1).unwrap();
    assert!(pinned.contains(&format!("[127.0.0.1]:{}", s.port)) && pinned.contains(key_b64), "{pinned}");
    // A second connector trusts the pinned key.
    let c2 = SshConnector::new(settings(&s, dir.path()));
    rt().block_on(async { c2.transport("m1", "127.0.0.1").probe().await.unwrap() });
}

#[test]
fn a_changed_host_key_is_refused() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Some other host's key, recorded for this address.
    let line = format!(
        "[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKaaNwi7V5t4Kdqf2ZPewsTFed0QKLzR+C+YkNGCD6U1\n",
        s.port
    );
    std::fs::write(dir.path().join("known_hosts"), line).unwrap();
    let c = SshConnector::new(settings(&s, dir.path()));
    let e =
        rt().block_on(async { c.transport("m1", "127.0.0.1").exec("true", b"", None).await.unwrap_err() }).to_string();
    assert!(e.contains("host key") && e.contains("changed") && e.contains("refusing"), "{e}");
}

#[test]
fn state_database_over_ssh() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = SshConnector::new(settings(&s, dir.path()));
    let t = c.transport("nimbus.t.p.0", "127.0.0.1");
    rt().block_on(async {
        assert!(machine_db::read(t.as_ref()).await.unwrap().is_none());
        let mut db = StateDb::default();
        db.machine.insert("machine".into(), "nimbus.t.p.0".into());
        db.set_step(0, "it's $(hostile)\nname", "abc", StepStatus::Done, Some(0));
        machine_db::write(t.as_ref(), &db).await.unwrap();
        let back = machine_db::read(t.as_ref()).await.unwrap().unwrap();
        assert_eq!(back.steps[0].name, "it's $(hostile)\nname");
        assert_eq!(back.machine["machine"], "nimbus.t.p.0");
    });
    let db = dir.path().join("machines/nimbus.t.p.0/state.db");
    assert!(db.exists());
    let leftovers: Vec<_> = std::fs::read_dir(db.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn proxy_command_gets_quoted_tokens() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let marker = dir.path().join("pwned");
    let mut st = settings(&s, dir.path());
    st.proxy_command = Some(format!("printf '%s|%s|%s' %h %p %r > {}; exec nc 127.0.0.1 {}", seen.display(), s.port));
    let c = SshConnector::new(st);
    let hostile = format!("i-0abc'; touch {}; echo '", marker.display());
    rt().block_on(async { c.transport("m", &hostile).probe().await.unwrap() });
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), format!("{hostile}|{}|{}", s.port, s.user));
    assert!(!marker.exists());
    assert_eq!(expand_proxy_command("a %h %p %r %% %x", "h", 2, "u"), "a 'h' 2 'u' % %x");
}

/// Issue 13.3: `proxy_command` runs with a minimal environment plus `ssh.env_passthrough`: none of the test
/// process's other variables (here the peers' `NIMBUS_*`, as an AWS key or an App key given to nimbus would be)
/// reach it.
#[test]
fn proxy_command_gets_a_minimal_environment() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("proxy-env");
    let mut st = settings(&s, dir.path());
    st.proxy_command = Some(format!("env > {}; exec nc 127.0.0.1 {}", dump.display(), s.port));
    st.env_passthrough = vec!["NIMBUS_SSHD_USER".into()];
    let c = SshConnector::new(st);
    rt().block_on(async { c.transport("m", "i-0env").probe().await.unwrap() });
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(std::env::var("NIMBUS_SSHD_KEY").is_ok() && std::env::var("NIMBUS_SSHD_URL").is_ok());
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    assert!(env.lines().any(|l| l == format!("NIMBUS_SSHD_USER={}", s.user)), "the allowlisted variable: {env}");
    let leaked: Vec<&str> =
        env.lines().filter(|l| l.starts_with("NIMBUS_") && !l.starts_with("NIMBUS_SSHD_USER=")).collect();
    assert!(leaked.is_empty(), "reached proxy_command: {leaked:?}");
}

#[test]
fn through_a_jump_host() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut st = settings(&s, dir.path());
    st.jump = Some(JumpHost { user: s.user.clone(), host: "127.0.0.1".into(), port: s.port });
    let c = SshConnector::new(st);
    let out = rt().block_on(async { c.transport("m", "127.0.0.1").exec("echo via-jump", b"", None).await.unwrap() });
    assert_eq!(out.stdout, b"via-jump\n");
    assert_eq!(
        JumpHost::parse("ec2-user@bastion:2200", "x"),
        Some(JumpHost { user: "ec2-user".into(), host: "bastion".into(), port: 2200 })
    );
}

#[test]
fn unreachable_is_reported() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut st = settings(&s, dir.path());
    // A closed loopback port.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    st.port = l.local_addr().unwrap().port();
    drop(l);
    let c = SshConnector::new(st);
    let e = rt().block_on(async { c.transport("m", "127.0.0.1").probe().await.unwrap_err() });
    assert!(matches!(e, nimbus::transport::TransportError::Unreachable { .. }), "{e}");
}

#[test]
fn hostile_values_survive_the_remote_shell() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = SshConnector::new(settings(&s, dir.path()));
    let marker = dir.path().join("pwned");
    let value = format!("a'b\"c $(touch {m}) `touch {m}`\nnext line", m = marker.display());
    let script = format!("{}printf '%s' \"$V\"", nimbus::util::shell::exports(&[("V", &value)]));
    let out = rt().block_on(async { c.transport("m", "127.0.0.1").exec(&script, b"", None).await.unwrap() });
    assert_eq!(String::from_utf8(out.stdout).unwrap(), value);
    assert!(!marker.exists());
}

/// Issue 12: a read-only look (`plan`) never writes known_hosts: an unknown host key is refused with what to
/// do. Only `apply` pins; `ssh.host_key_policy: require-known` never does. After a reimage, the pin is forgotten.
#[test]
fn only_apply_pins_host_keys() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let look = SshConnector::new(SshSettings { pin_new_keys: false, ..settings(&s, dir.path()) });
    rt().block_on(async {
        let e = look.transport("m1", "127.0.0.1").probe().await.unwrap_err().to_string();
        assert!(e.contains("is not known yet") && e.contains("nimbus apply"), "{e}");
        assert!(!dir.path().join("known_hosts").exists(), "a look wrote known_hosts");
        let change = SshConnector::new(settings(&s, dir.path()));
        let t = change.transport("m1", "127.0.0.1");
        t.probe().await.unwrap();
        assert!(dir.path().join("known_hosts").exists());
        // Known now: a look may connect.
        let look = SshConnector::new(SshSettings { pin_new_keys: false, ..settings(&s, dir.path()) });
        look.transport("m1", "127.0.0.1").probe().await.unwrap();
        // A reimaged machine has a new host key: the old pin is forgotten.
        t.forget_identity().await.unwrap();
        assert!(!std::fs::read_to_string(dir.path().join("known_hosts")).unwrap().contains("127.0.0.1"));
    });
    // The fleet file's policy decides what apply may do.
    let fleet = |policy: &str| {
        let text = format!(
            "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\nssh:\n  user: u\n{policy}pools: []\n"
        );
        nimbus::config::LoadedConfig::from_config("f", nimbus::config::parse("f", &text).unwrap(), dir.path()).unwrap()
    };
    use nimbus::engine::clients::{Purpose, ssh_connector};
    let pins = |l: &nimbus::config::LoadedConfig, p| ssh_connector(l, p).unwrap().unwrap().settings().pin_new_keys;
    let default = fleet("");
    assert!(pins(&default, Purpose::Change) && !pins(&default, Purpose::Look));
    let strict = fleet("  host_key_policy: require-known\n");
    assert!(!pins(&strict, Purpose::Change) && !pins(&strict, Purpose::Look));
}

/// Issue 12: host keys are pinned under the instance id where a provider has one, so a new machine that reuses
/// an old machine's address is not refused for the old machine's key; sessions are cached per instance too.
#[test]
fn pins_follow_the_instance_not_the_address() {
    let Some(s) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    // An old machine at this address had another key.
    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    std::fs::write(dir.path().join("known_hosts"), format!("[127.0.0.1]:{} {other}\n", s.port)).unwrap();
    let c = SshConnector::new(settings(&s, dir.path()));
    rt().block_on(async {
        let by_address = c.transport("m1", "127.0.0.1").probe().await.unwrap_err().to_string();
        assert!(by_address.contains("changed"), "{by_address}");
        c.transport_pinned_as("m1", "127.0.0.1", "i-0new").probe().await.unwrap();
    });
    let pins = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
    assert!(pins.contains("i-0new"), "{pins}");
}

/// Issue 12: the default state path works for a login without root: with no passwordless sudo, the state
/// database goes to the user's XDG state folder, and it is read back from there.
#[test]
fn the_default_state_path_works_without_root() {
    let Some(s) = sshd() else { return };
    let user = std::env::var("NIMBUS_SSHD_NONROOT_USER").expect("scripts/peers.sh makes a non-root login");
    let dir = tempfile::tempdir().unwrap();
    let c = SshConnector::new(SshSettings {
        user: user.clone(),
        state_path: nimbus::transport::ssh::REMOTE_STATE_PATH.to_string(),
        ..settings(&s, dir.path())
    });
    let t = c.transport("nonroot", "127.0.0.1");
    rt().block_on(async {
        assert_ne!(t.exec("id -u", b"", None).await.unwrap().stdout, b"0\n", "not root");
        let _ = t.exec("rm -f \"$HOME/.local/state/nimbus/state.db\"", b"", None).await;
        assert!(machine_db::read(t.as_ref()).await.unwrap().is_none());
        let mut db = StateDb::default();
        db.set_step(0, "base", "h", StepStatus::Done, Some(0));
        machine_db::write(t.as_ref(), &db).await.unwrap();
        let back = machine_db::read(t.as_ref()).await.unwrap().unwrap();
        assert_eq!(back.steps[0].name, "base");
        let home = t.exec("printf %s \"$HOME\"", b"", None).await.unwrap().stdout;
        let at = format!("{}/.local/state/nimbus/state.db", String::from_utf8_lossy(&home));
        assert!(std::path::Path::new(&at).exists(), "{at}");
    });
}
