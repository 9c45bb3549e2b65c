//! End to end: an AWS fleet on moto whose machines are reached by
//! `proxy_command` to a loopback sshd. plan → apply (setup over SSH, state on
//! the machine) → plan (no changes) → scale down → deferred release.
//! Also: an unreachable machine is shown as such, and the SSH key never
//! appears in any output, the journal or the machine state.

mod common;

use std::path::Path;

use common::*;

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
  proxy_command: "echo %h >> {d}/proxied; exec nc 127.0.0.1 {proxy_port}"
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
    // Each machine's host key was pinned on first contact, under the name SSH knows it by (%h).
    let pinned = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
    assert_eq!(pinned.lines().filter(|l| l.starts_with("i-") || l.starts_with("[i-")).count(), 2, "{pinned}");

    // Converged: state read back over SSH, nothing to do.
    let o = ok(&["plan", "--detailed-exitcode"], 0);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("No changes."), "{}", text(&o));

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
