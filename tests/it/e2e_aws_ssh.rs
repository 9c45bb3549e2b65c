//! End to end: an AWS fleet on moto whose machines are reached by
//! `proxy_command` to a loopback sshd. plan → apply (setup over SSH, state on
//! the machine) → plan (no changes) → scale down → deferred release.
//! Also: an unreachable machine is shown as such, and the SSH key never
//! appears in any output, the journal or the machine state.

use std::path::Path;

use crate::common::*;

struct Peers {
    moto: String,
    ssh_port: u16,
    ssh_key: String,
    ssh_user: String,
}

fn peers() -> Option<Peers> {
    let moto = peer("NIMBUS_MOTO_URL", "moto (EC2)")?;
    let ssh = peer("NIMBUS_SSHD_URL", "sshd")?;
    Some(Peers {
        moto,
        ssh_port: ssh.rsplit(':').next().unwrap().parse().unwrap(),
        ssh_key: std::env::var("NIMBUS_SSHD_KEY").unwrap(),
        ssh_user: std::env::var("NIMBUS_SSHD_USER").unwrap(),
    })
}

fn fleet(p: &Peers, dir: &Path, tenant: &str, mac: u32, proxy_port: u16) -> String {
    let d = dir.display();
    format!(
        r#"version: 1
tenant: {tenant}
providers:
  aws:
    type: aws
    region: us-east-1
ssh:
  user: {user}
  key: {{file: {key}}}
  known_hosts: known_hosts
  # Every instance id (%h) is routed to the loopback sshd; the log proves the token.
  proxy_command: "echo %h >> {d}/proxied; env > {d}/proxy-env; exec nc 127.0.0.1 {proxy_port}"
  state_path: "{d}/machines/{{machine}}/state.db"
  connect_timeout: 5s
pools:
  - name: mac
    provider: aws
    count: {mac}
    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}
    setup:
      - name: tools
        run: mkdir -p "{d}/machines/$NIMBUS_MACHINE" && echo installed > "{d}/machines/$NIMBUS_MACHINE/tools"
      - name: xcode
        run: echo "selecting xcode on $NIMBUS_MACHINE"
"#,
        user = p.ssh_user,
        key = p.ssh_key,
    )
}

#[test]
fn aws_fleet_over_ssh_end_to_end() {
    let Some(p) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tenant = unique_tenant("e2e");
    let env = aws_env(&p.moto);
    let write = |mac: u32, port: u16| {
        std::fs::write(dir.path().join("fleet.yaml"), fleet(&p, dir.path(), &tenant, mac, port)).unwrap()
    };
    let run = |args: &[&str]| nimbus_env(dir.path(), args, &env);
    let mut outputs = String::new();
    let mut ok = |args: &[&str], code: i32| {
        let o = run(args);
        outputs.push_str(&text(&o));
        assert_eq!(o.status.code(), Some(code), "nimbus {args:?}\n{}", text(&o));
        o
    };

    write(2, p.ssh_port);
    let o = ok(&["plan", "--detailed-exitcode"], 2);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Plan: 2 to add, 0 to change, 0 to destroy."));
    ok(&["apply", "--auto-approve"], 0);
    for m in 0..2 {
        let machine = format!("nimbus.{tenant}.mac.{m}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(format!("machines/{machine}/tools"))).unwrap(),
            "installed\n"
        );
        assert!(dir.path().join(format!("machines/{machine}/state.db")).exists());
    }
    let proxied = std::fs::read_to_string(dir.path().join("proxied")).unwrap();
    assert!(proxied.lines().all(|l| l.starts_with("i-")), "%h is the instance id: {proxied}");
    // Issue 13.3: proxy_command runs with a minimal environment: the AWS keys nimbus was given are not in it.
    let proxy_env = std::fs::read_to_string(dir.path().join("proxy-env")).unwrap();
    assert!(proxy_env.lines().any(|l| l.starts_with("PATH=")), "{proxy_env}");
    assert!(env.iter().any(|(k, _)| *k == "AWS_SECRET_ACCESS_KEY"));
    for k in ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"] {
        assert!(!proxy_env.contains(k), "{k} reached proxy_command: {proxy_env}");
    }
    // Each machine's host key was pinned on first contact, under the name SSH knows it by (%h).
    let pinned = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
    assert_eq!(pinned.lines().filter(|l| l.starts_with("i-") || l.starts_with("[i-")).count(), 2, "{pinned}");

    // Converged: state read back over SSH, nothing to do.
    let o = ok(&["plan", "--detailed-exitcode"], 0);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("No changes."), "{}", text(&o));
    // Issue 19.4: the seed's SSH and cloud-provider events, with tenant_id, machine_id, duration.
    let o = ok(&["--log-format", "json", "plan"], 0);
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stderr).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let named = |n: &str| events.iter().filter(|e| e["fields"]["event"] == n).collect::<Vec<_>>();
    for n in [
        "nimbus.ssh.connect_start",
        "nimbus.ssh.connect_success",
        "nimbus.ssh.command_start",
        "nimbus.ssh.command_success",
    ] {
        let evs = named(n);
        assert!(!evs.is_empty(), "no {n}");
        for e in evs {
            assert_eq!(e["fields"]["tenant_id"], tenant.as_str(), "{e}");
            assert!(e["fields"]["machine_id"].as_str().unwrap().starts_with(&format!("nimbus.{tenant}.mac.")), "{e}");
            if n.ends_with("_success") {
                assert!(e["fields"]["duration"].is_u64(), "{e}");
            }
        }
    }
    let calls = named("nimbus.cloud_provider.api_call_success");
    assert!(
        calls
            .iter()
            .any(|e| e["fields"]["operation"] == "DescribeInstances" && e["fields"]["tenant_id"] == tenant.as_str()),
        "{calls:?}"
    );

    // A new step runs in place, over SSH.
    let f = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap()
        + "      - name: extra\n        run: echo extra > \"$HOME/.nimbus-extra-$NIMBUS_MACHINE\"\n";
    std::fs::write(dir.path().join("fleet.yaml"), &f).unwrap();
    let o = ok(&["plan", "--json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["change"], 2);
    ok(&["apply", "--auto-approve"], 0);
    ok(&["plan", "--detailed-exitcode"], 0);

    // Scale down: terminate now, release deferred.
    let f = f.replace("count: 2", "count: 1");
    std::fs::write(dir.path().join("fleet.yaml"), &f).unwrap();
    ok(&["apply", "--auto-approve"], 0);
    let o = ok(&["plan", "--detailed-exitcode"], 0);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("release, due") && out.contains("1 deferred"), "{out}");

    // Unreachable: the route to the machine is gone. Reported, not guessed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        dir.path().join("fleet.yaml"),
        f.replace(&format!("nc 127.0.0.1 {}", p.ssh_port), &format!("nc 127.0.0.1 {closed}")),
    )
    .unwrap();
    let o = ok(&["plan", "--json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("unreachable"), "{warnings}");
    assert!(v["actions"].as_array().unwrap().is_empty());
    // Issue 9.6: a drift check never says "no changes" while a machine cannot be reached.
    let o = ok(&["plan", "--detailed-exitcode"], 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("could not be checked"), "{}", text(&o));

    // A changed host key is refused, and is not "no changes" either.
    std::fs::write(dir.path().join("fleet.yaml"), &f).unwrap();
    ok(&["plan", "--detailed-exitcode"], 0);
    let kh = dir.path().join("known_hosts");
    let pinned = std::fs::read_to_string(&kh).unwrap();
    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    let forged: String = pinned
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((host, _)) => format!("{host} {other}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&kh, forged).unwrap();
    let o = ok(&["plan", "--detailed-exitcode"], 1);
    assert!(text(&o).contains("could not be checked"), "{}", text(&o));
    std::fs::write(&kh, pinned).unwrap();

    // The SSH private key never shows up anywhere.
    let key = std::fs::read_to_string(&p.ssh_key).unwrap();
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let hist = run(&["history", "--json"]);
    outputs.push_str(&text(&hist));
    let mut haystack = outputs.clone();
    haystack.push_str(&String::from_utf8_lossy(&std::fs::read(dir.path().join(".nimbus/journal.db")).unwrap()));
    for entry in walk(dir.path()) {
        if let Ok(bytes) = std::fs::read(&entry) {
            haystack.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    for line in body {
        assert!(!haystack.contains(line), "a line of the SSH private key leaked");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// The whole chain with a forge: AWS (moto) → SSH (proxy_command to sshd) →
/// setup → runner installed and registered (stateful fake forge, whose
/// request shapes the Prism contract tests cover) → no changes → scale down →
/// runner deregistered, instance terminated, host release deferred.
#[test]
fn aws_ssh_and_forge_end_to_end() {
    use std::sync::Arc;

    use nimbus::engine::actions::Applier;
    use nimbus::forges::Forge;
    use nimbus::forges::fake::FakeForge;
    use nimbus::providers::aws::{AwsProvider, AwsSettings};
    use nimbus::providers::{MachineRef, Provider};
    use nimbus::transport::ssh::{SshAuth, SshConnector, SshSettings};

    let Some(p) = peers() else { return };
    use_moto_env(&p.moto);
    let dir = tempfile::tempdir().unwrap();
    let tenant = unique_tenant("forge");
    let d = dir.path().display().to_string();
    let fleet = |count: u32| {
        format!(
            "version: 1\ntenant: {tenant}\nproviders:\n  aws: {{type: aws, region: us-east-1}}\nforge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {{env: UNUSED}}\n  org: acme\nssh:\n  user: {u}\n  proxy_command: \"nc 127.0.0.1 {port}\"\npools:\n  - name: mac\n    provider: aws\n    count: {count}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0abc, availability_zone: us-east-1a}}\n    runner: {{labels: [linux, big]}}\n    setup:\n      - name: base\n        run: mkdir -p \"{d}/machines/$NIMBUS_MACHINE\"\n",
            u = p.ssh_user,
            port = p.ssh_port
        )
    };
    let desired = |count: u32| {
        nimbus::core::model::Desired::from_config(&nimbus::config::parse("fleet.yaml", &fleet(count)).unwrap())
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ssh = SshConnector::new(SshSettings {
        user: p.ssh_user.clone(),
        port: p.ssh_port,
        auth: SshAuth::Key(Arc::new(russh::keys::load_secret_key(&p.ssh_key, None).unwrap())),
        known_hosts: dir.path().join("known_hosts"),
        proxy_command: Some(format!("nc 127.0.0.1 {}", p.ssh_port)),
        jump: None,
        connect_timeout: std::time::Duration::from_secs(5),
        state_path: format!("{d}/machines/{{machine}}/state.db"),
        pin_new_keys: true,
        env_passthrough: Vec::new(),
    });
    let connector = ssh.clone();
    let provider: Arc<dyn Provider> = Arc::new(
        rt.block_on(AwsProvider::new(
            "aws",
            &tenant,
            AwsSettings { region: Some("us-east-1".into()), ..Default::default() },
        ))
        .unwrap()
        .with_transport(Arc::new(move |m: &MachineRef| Some(ssh.transport(&m.name, m.instance_id.as_deref()?)))),
    );
    let (url, sha256) = fake_runner(dir.path());
    let forge = Arc::new(FakeForge::new(url).with_sha256("linux-x64", &sha256));
    let actual = || {
        rt.block_on(nimbus::engine::discovery::discover_with_forge(
            &tenant,
            std::slice::from_ref(&provider),
            Some(forge.as_ref() as &dyn Forge),
        ))
        .unwrap()
    };
    let apply = |want: &nimbus::core::model::Desired| {
        let a = actual();
        let plan = nimbus::core::plan::plan(want, &a, chrono::Utc::now());
        let applier = Applier::new(want.clone(), &a, vec![provider.clone()], Some(dir.path().join("logs")))
            .with_forge(forge.clone(), Some(format!("{d}/machines/{{machine}}/actions-runner")));
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let report =
            rt.block_on(nimbus::engine::walk::execute(Arc::new(plan.graph.clone()), Arc::new(applier), 10, |_| {}));
        assert!(report.succeeded(), "{:?}", report.outcomes);
        // The machine side: configured runners appear on the forge.
        for entry in std::fs::read_dir(dir.path().join("machines")).unwrap().flatten() {
            runner_comes_online(&forge, &entry.path().join("actions-runner"));
        }
        plan
    };

    let two = desired(2);
    // Issue 13.3: `ps -eo args` sampled on this computer (where the sshd peer runs the machines' commands)
    // throughout setup and registration never shows a registration token, while it does see the agent run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
                seen.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen
        })
    };
    let first = apply(&two);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    assert!(seen.iter().any(|l| l.contains("config.sh --unattended")), "the sampler saw the agent being configured");
    let tokens = forge.tokens_issued();
    assert_eq!(tokens.len(), 2);
    for line in &seen {
        assert!(!tokens.iter().any(|t| line.contains(t.as_str())) && !line.contains("--token"), "in argv: {line}");
    }
    assert_eq!(first.summary().add, 2);
    assert_eq!(forge.runners().len(), 2);
    let again = nimbus::core::plan::plan(&two, &actual(), chrono::Utc::now());
    assert!(again.is_empty() && again.warnings.is_empty(), "{:?} {:?}", again.changes, again.warnings);
    // Issue 12: discovery read both machines over SSH and kept no connection open.
    assert_eq!(rt.block_on(connector.open_sessions()), 0, "discovery closes its sessions");

    let one = desired(1);
    let down = apply(&one);
    let kinds: Vec<&str> = down.actions().map(|(_, a)| a.kind.name()).collect();
    assert_eq!(kinds, ["deregister_runner", "terminate_instance"]);
    assert_eq!(forge.runners().iter().map(|r| r.name.clone()).collect::<Vec<_>>(), [format!("nimbus.{tenant}.mac.0")]);
    let after = nimbus::core::plan::plan(&one, &actual(), chrono::Utc::now());
    assert!(after.is_empty(), "{:?}", after.changes);

    // Issue 11: the runner goes offline on a machine that still answers. Within its grace nothing happens;
    // past it (the journal remembers when it was first seen offline), its agent is restarted over SSH.
    let name = format!("nimbus.{tenant}.mac.0");
    forge.set_online(&name, false);
    let journal = nimbus::state::journal::Journal::open(&dir.path().join("journal.db")).unwrap();
    let now = chrono::Utc::now();
    let observed = |at| {
        let mut a = actual();
        nimbus::engine::discovery::annotate_with_history(&mut a, &journal, at).unwrap();
        a
    };
    let fresh = observed(now - chrono::Duration::minutes(20));
    assert!(nimbus::core::plan::plan(&one, &fresh, now - chrono::Duration::minutes(20)).is_empty(), "inside the grace");
    let late = observed(now);
    assert_eq!(
        late.runners.as_ref().unwrap()[0].offline_since,
        Some(fresh.runners.as_ref().unwrap()[0].offline_since.unwrap())
    );
    let plan = nimbus::core::plan::plan(&one, &late, now);
    let kinds: Vec<&str> = plan.actions().map(|(_, a)| a.kind.name()).collect();
    assert_eq!(kinds, ["restart_runner"]);
    assert!(plan.changes[0].reason.contains("runner offline since"), "{}", plan.changes[0].reason);
    let applier = Applier::new(one.clone(), &late, vec![provider.clone()], Some(dir.path().join("logs")))
        .with_forge(forge.clone(), Some(format!("{d}/machines/{{machine}}/actions-runner")));
    let report =
        rt.block_on(nimbus::engine::walk::execute(Arc::new(plan.graph.clone()), Arc::new(applier), 10, |_| {}));
    assert!(report.succeeded(), "{:?}", report.outcomes);
    let service = std::fs::read_to_string(dir.path().join(format!("machines/{name}/actions-runner/.service"))).unwrap();
    assert_eq!(service, "install\nstart\nstop\nstart\n", "the agent's service was restarted on the machine");
}
