//! Issue 13: a fleet file is code. `nimbus plan --trusted-base BASE` refuses an untrusted (pull request) fleet
//! file that changes what runs a command or where a credential goes, before anything runs or connects.

use std::io::ErrorKind;
use std::net::TcpListener;

use crate::common::*;

fn base(extra: &str) -> String {
    format!(
        "version: 1\ntenant: trust\nproviders:\n  local:\n    type: local\n{extra}pools:\n  - name: linux\n    provider: local\n    count: 1\n    machine: {{os: linux, arch: x86_64, image: ubuntu-24.04}}\n"
    )
}

fn plan(dir: &std::path::Path, pr: &str, base_text: &str) -> std::process::Output {
    std::fs::write(dir.join("base.yaml"), base_text).unwrap();
    std::fs::write(dir.join("fleet.yaml"), pr).unwrap();
    nimbus_env(dir, &["plan", "--trusted-base", "base.yaml", "--detailed-exitcode"], &[])
}

#[test]
fn a_pull_request_that_changes_proxy_command_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let trusted = base("ssh:\n  user: ci\n  proxy_command: \"nc 127.0.0.1 9\"\n");
    let pr = trusted.replace("nc 127.0.0.1 9", &format!("touch {}", marker.display()));
    let o = plan(dir.path(), &pr, &trusted);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("a change to ssh.proxy_command must be applied by a maintainer"), "{err}");
    assert!(err.contains("fleet.yaml:"), "points at the file, line and column: {err}");
    assert!(err.contains("trusted base"), "{err}");
    assert!(o.stdout.is_empty(), "no plan is shown");
    assert!(!marker.exists(), "the pull request's command ran");
}

#[test]
fn a_pull_request_that_points_the_forge_elsewhere_sends_it_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let forge = |url: &str| {
        format!(
            "forge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  org: acme\n  private_key: {{env: NIMBUS_TRUST_APP_KEY}}\n  api_url: {url}\n"
        )
    };
    let trusted = base(&forge("https://api.github.com"));
    let pr = base(&forge(&format!("http://127.0.0.1:{port}")));
    std::fs::write(dir.path().join("base.yaml"), &trusted).unwrap();
    std::fs::write(dir.path().join("fleet.yaml"), &pr).unwrap();
    let o = nimbus_env(
        dir.path(),
        &["plan", "--trusted-base", "base.yaml"],
        &[("NIMBUS_TRUST_APP_KEY", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n".into())],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a change to forge.api_url must be applied by a maintainer"));
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the listener was contacted: {other:?}"),
    }
}

#[test]
fn every_changed_trusted_field_is_named_and_other_changes_plan_normally() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = base("journal:\n  path: state/journal.db\n");
    // Region-like and location fields: the tenant, a new provider, the journal's path.
    let pr = trusted
        .replace("tenant: trust", "tenant: other")
        .replace("journal.db", "elsewhere.db")
        .replace("providers:\n", "providers:\n  extra:\n    type: local\n    data_dir: /tmp\n");
    let o = plan(dir.path(), &pr, &trusted);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for field in ["tenant", "journal.path", "providers.extra.type", "providers.extra.data_dir"] {
        assert!(err.contains(&format!("a change to {field} must be applied by a maintainer")), "{field}: {err}");
    }
    // What lets a credential through to a child, or chooses the code a machine runs, is trusted too.
    let pr = trusted.replace("    type: local\n", "    type: local\n    env_passthrough: [AWS_SECRET_ACCESS_KEY]\n");
    let o = plan(dir.path(), &pr, &trusted);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("a change to providers.local.env_passthrough must"),
        "{}",
        text(&o)
    );
    let forge = "forge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {env: K}\n  org: acme\n";
    let with_forge = trusted.replace("pools:\n", &format!("{forge}pools:\n"));
    for (field, line) in [
        (
            "forge.runner_sha256",
            "  runner_sha256: {linux-x64: 0000000000000000000000000000000000000000000000000000000000000000}\n",
        ),
        ("forge.runner_group_id", "  runner_group_id: 9\n"),
    ] {
        let pr = with_forge.replace("  org: acme\n", &format!("  org: acme\n{line}"));
        let o = plan(dir.path(), &pr, &with_forge);
        assert_eq!(o.status.code(), Some(1), "{field}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("a change to {field} must")), "{}", text(&o));
    }
    // A change a reviewer can judge from the plan (the pool's size) plans as usual.
    let o = plan(dir.path(), &trusted.replace("count: 1", "count: 3"), &trusted);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn setup_steps_never_run_during_plan() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("setup-ran");
    let fleet = base("").replace(
        "    machine:",
        &format!("    setup:\n      - name: mark\n        run: touch {}\n    machine:", marker.display()),
    );
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mark"), "the plan shows the step: {}", text(&o));
    assert!(!marker.exists(), "plan ran a setup step");
    // Apply does run it: the marker above can appear.
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(marker.exists(), "apply runs the step");
}

/// Issue 13: the registration token and the JIT config reach the agent through its environment, never its
/// command line (where `ps` shows them for the runner's whole life): neither the script nimbus runs with
/// `sh -c` nor any command in it carries the secret.
#[test]
fn runner_secrets_never_reach_a_command_line() {
    use nimbus::forges::github::agent::GithubAgent;
    use nimbus::forges::{AgentTarget, Registration, RunnerAgent, Secret};
    let agent = GithubAgent::new("https://example.invalid/{os}-{arch}.tgz");
    let labels = vec!["linux".to_string()];
    let target = AgentTarget {
        machine: "nimbus.acme.linux.0",
        labels: &labels,
        os: nimbus::config::Os::Linux,
        arch: nimbus::config::Arch::X86_64,
        dir: None,
    };
    for ephemeral in [false, true] {
        let group = (!ephemeral).then(|| "ci macs; $(id)".to_string());
        let reg = Registration {
            runner_id: None,
            url: Some("https://github.com/acme".into()),
            secret: Secret::new("s3cr3t-registration-value"),
            ephemeral,
            group: group.clone(),
        };
        let install = agent.install(&target, &reg);
        assert!(!install.script.contains("s3cr3t"), "{}", install.script);
        assert!(!install.script.contains("--token") && !install.script.contains("--jitconfig"), "{}", install.script);
        let var = if ephemeral {
            "ACTIONS_RUNNER_INPUT_JITCONFIG=\"$secret\""
        } else {
            "ACTIONS_RUNNER_INPUT_TOKEN=\"$secret\""
        };
        assert!(install.script.contains(var), "{}", install.script);
        assert_eq!(install.stdin, b"s3cr3t-registration-value\n");
        // A persistent runner joins its group (issue 13.3), the name quoted as one word.
        if let Some(g) = &group {
            assert!(
                install.script.contains(&format!("--runnergroup {}", nimbus::util::shell::quote(g))),
                "{}",
                install.script
            );
        }
    }
}

/// Issue 13: a local machine's setup steps run with a minimal environment: the credentials nimbus holds (AWS
/// keys, a GitHub App key passed by `{env: ...}`) are not in the child's environment.
#[test]
fn local_setup_steps_do_not_inherit_nimbus_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("child-env");
    let fleet = base("    env_passthrough: [BUILD_CACHE_URL]\n")
        .replace("tenant: trust\n", "tenant: trust\nenv_passthrough: [FLEET_WIDE]\n")
        .replace(
            "    machine:",
            &format!("    setup:\n      - name: dump\n        run: env > {}\n    machine:", dump.display()),
        );
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    let o = nimbus_env(
        dir.path(),
        &["apply", "--auto-approve"],
        &[
            ("BUILD_CACHE_URL", "http://cache.invalid".into()),
            ("FLEET_WIDE", "yes".into()),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123".into()),
            ("NIMBUS_APP_KEY", "-----BEGIN PRIVATE KEY-----app-key-456".into()),
            ("GITHUB_TOKEN", "ghs_token789".into()),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(env.contains("PATH="), "the step still has a PATH: {env}");
    assert!(env.contains("BUILD_CACHE_URL=http://cache.invalid"), "env_passthrough lets a variable through: {env}");
    assert!(env.contains("FLEET_WIDE=yes"), "the fleet-wide env_passthrough too: {env}");
    // A name that is not a variable's is refused at its position.
    std::fs::write(dir.path().join("fleet.yaml"), fleet.replace("[FLEET_WIDE]", "[\"A B\"]")).unwrap();
    let o = nimbus_env(dir.path(), &["validate"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an environment variable's name"), "{}", text(&o));
    for secret in ["aws-secret-value-123", "app-key-456", "ghs_token789", "AWS_SECRET_ACCESS_KEY"] {
        assert!(!env.contains(secret), "`{secret}` reached the step's environment");
    }
}

/// Issue 13.4: what a machine prints when a step fails reaches the apply's progress and error lines with its
/// control characters defused: no escape sequence, carriage return or bidirectional override gets through.
#[test]
fn a_failing_steps_hostile_output_is_defused_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = base("").replace(
        "    machine:",
        "    setup:\n      - name: hostile\n        run: printf 'boom\\033[2J\\033]8;;http://evil.example\\007link\\033]8;;\\007\\r\\342\\200\\256txt.exe\\n' >&2; exit 3\n    machine:",
    );
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("boom"), "the step's output is shown: {err}");
    for bad in ['\u{1b}', '\u{7}', '\r', '\u{202E}'] {
        assert!(!err.contains(bad), "{bad:?} reached the terminal: {err:?}");
    }
    // The journal keeps the error as it was; `history` shows it defused too.
    for args in [&["history"][..], &["history", "--run", "latest"]] {
        let o = nimbus_env(dir.path(), args, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("boom"), "{args:?}: {out}");
        for bad in ['\u{1b}', '\u{7}', '\r', '\u{202E}'] {
            assert!(!out.contains(bad), "{args:?}: {bad:?} reached the terminal: {out:?}");
        }
    }
}

fn fleet_file(dir: &std::path::Path, file: &str, extra: &str, pools: &[(&str, u32)]) {
    let pools: String = pools
        .iter()
        .map(|(name, count)| {
            format!("  - name: {name}\n    provider: local\n    count: {count}\n    machine: {{os: linux, arch: x86_64, image: ubuntu-24.04}}\n")
        })
        .collect();
    let text = format!("version: 1\ntenant: shared\n{extra}providers:\n  local:\n    type: local\npools:\n{pools}");
    std::fs::write(dir.join(file), text).unwrap();
}

fn plan_of(dir: &std::path::Path, file: &str) -> serde_json::Value {
    let o = nimbus_env(dir, &["plan", "-f", file, "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn changes(plan: &serde_json::Value) -> Vec<String> {
    plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["actions"][0].as_str().unwrap(), c["address"].as_str().unwrap()))
        .collect()
}

/// Issue 13.5: two fleet files of one tenant (same folder, same sandboxes) each tag what they make
/// `nimbus:fleet=<id>` and leave the other's machines alone; a pool name both use keeps apart by number;
/// `adopt_fleets` takes the other's machines over; a machine made before fleets were recorded belongs to the
/// fleet that declares its pool.
#[test]
fn two_fleet_files_of_one_tenant_leave_each_other_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet_file(d, "one.yaml", "", &[("a", 2)]);
    fleet_file(d, "two.yaml", "", &[("b", 1)]);
    for f in ["one.yaml", "two.yaml"] {
        let o = nimbus_env(d, &["apply", "-f", f, "--auto-approve"], &[]);
        assert_eq!(o.status.code(), Some(0), "{f}: {}", text(&o));
    }
    for f in ["one.yaml", "two.yaml"] {
        let p = plan_of(d, f);
        assert!(changes(&p).is_empty(), "{f} plans to touch the other fleet: {:?}", changes(&p));
    }
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join(".nimbus/local/nimbus.shared.a.0/nimbus.json")).unwrap()).unwrap();
    assert_eq!(rec["tags"]["nimbus:fleet"], "one.yaml", "{rec}");

    // The same pool name in both: it could be one fleet under two ids (a moved file, a checkout without git), so
    // nothing is created in that pool, and the plan says how to settle it.
    fleet_file(d, "two.yaml", "", &[("b", 1), ("a", 1)]);
    let p = plan_of(d, "two.yaml");
    assert!(changes(&p).is_empty(), "{p}");
    let warnings = p["warnings"].to_string();
    assert!(warnings.contains("fleet `one.yaml` has machines of a pool named `a` too"), "{warnings}");
    assert!(warnings.contains("no machine of pool `a` is created"), "{warnings}");
    fleet_file(d, "two.yaml", "", &[("b", 1)]);

    // Adopting: the other fleet's machines are this one's now (here: orphans of a pool it does not declare).
    fleet_file(d, "two.yaml", "adopt_fleets: [one.yaml]\n", &[("b", 1)]);
    let p = plan_of(d, "two.yaml");
    assert_eq!(changes(&p), ["delete a[0]", "delete a[1]"], "{p}");
    fleet_file(d, "two.yaml", "", &[("b", 1)]);

    // A machine without a fleet tag (made before nimbus recorded fleets) is the fleet's that declares its pool.
    let path = d.join(".nimbus/local/nimbus.shared.a.1/nimbus.json");
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    rec["tags"].as_object_mut().unwrap().remove("nimbus:fleet");
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    assert!(changes(&plan_of(d, "one.yaml")).is_empty());
    assert!(changes(&plan_of(d, "two.yaml")).is_empty());
}

/// The default fleet id is the file's real path in its git repository: the same from any folder and through
/// `..`, so a fleet always finds its own machines.
#[test]
fn the_default_fleet_id_is_the_files_path_in_its_repository() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join(".git")).unwrap();
    std::fs::create_dir_all(d.join("fleets/sub")).unwrap();
    fleet_file(&d.join("fleets"), "mac.yaml", "", &[("a", 1)]);
    let o = nimbus_env(d, &["apply", "-f", "fleets/sub/../mac.yaml", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("fleets/.nimbus/local/nimbus.shared.a.0/nimbus.json")).unwrap())
            .unwrap();
    assert_eq!(rec["tags"]["nimbus:fleet"], "fleets/mac.yaml", "{rec}");
    // From the fleet's own folder, the same fleet: nothing to do.
    let o = nimbus_env(&d.join("fleets"), &["plan", "-f", "mac.yaml", "--detailed-exitcode"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // An explicit `fleet:` is another id: its plan leaves these machines alone, and creates none in their pool.
    fleet_file(&d.join("fleets"), "mac.yaml", "fleet: renamed\n", &[("a", 1)]);
    let p = plan_of(&d.join("fleets"), "mac.yaml");
    assert!(changes(&p).is_empty(), "{p}");
    assert!(p["warnings"].to_string().contains("set `fleet: fleets/mac.yaml`"), "{p}");
}

/// Issue 24.1: who an AWS provider (or the S3 state) acts as is trusted-only: a pull request cannot point a
/// provider at another profile, role, external id or token, and nothing is contacted; a tag change plans as usual.
#[test]
fn a_pull_request_cannot_change_who_nimbus_acts_as() {
    let dir = tempfile::tempdir().unwrap();
    let aws = |keys: &str| {
        format!(
            "version: 1\ntenant: trust\nproviders:\n  local:\n    type: local\n  aws:\n    type: aws\n    region: us-east-1\n{keys}pools:\n  - name: linux\n    provider: local\n    count: 1\n    tags: {{team: a}}\n    machine: {{os: linux, arch: x86_64, image: ubuntu-24.04}}\n"
        )
    };
    let trusted = aws("    role_arn: arn:aws:iam::123456789012:role/nimbus\n    external_id: {env: EXT}\n");
    for (field, pr) in [
        (
            "providers.aws.profile",
            aws(
                "    profile: admin\n    role_arn: arn:aws:iam::123456789012:role/nimbus\n    external_id: {env: EXT}\n",
            ),
        ),
        ("providers.aws.role_arn", trusted.replace("role/nimbus", "role/admin")),
        ("providers.aws.external_id", trusted.replace("{env: EXT}", "{env: OTHER}")),
        (
            "providers.aws.web_identity",
            trusted.replace("    external_id: {env: EXT}\n", "    web_identity: {file: /tmp/token}\n"),
        ),
        ("providers.aws.duration", trusted.replace("    external_id", "    duration: 12h\n    external_id")),
        ("providers.aws.session_name", trusted.replace("    external_id", "    session_name: x-y\n    external_id")),
    ] {
        let o = plan(dir.path(), &pr, &trusted);
        assert_eq!(o.status.code(), Some(1), "{field}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&format!("a change to {field} must")),
            "{field}: {}",
            text(&o)
        );
    }
    let state = |profile: &str| {
        format!("{}state: {{backend: s3, bucket: b, key: k, profile: {profile}}}\n", aws(""))
            .replace("state:", "state:")
    };
    let o = plan(dir.path(), &state("other"), &state("mine"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a change to state.profile must"), "{}", text(&o));
    // A tag is for the reviewer to judge in the plan (a local fleet: nothing leaves this computer).
    let local = base("").replace("    count: 1\n", "    count: 1\n    tags: {team: a}\n");
    let o = plan(dir.path(), &local.replace("team: a", "team: b"), &local);
    assert_eq!(o.status.code(), Some(2), "a tag change plans as usual: {}", text(&o));
}
