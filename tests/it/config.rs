//! The fleet file: every invalid fixture gives a positioned error with a
//! hint (snapshotted), every valid fixture and example loads, secrets written
//! inline never reach the output, and the checked-in schema matches the code.

use std::path::Path;

use nimbus::config::{self, ConfigError};

fn invalid_diagnostics(path: &Path) -> Vec<nimbus::config::ConfigDiagnostic> {
    match config::load(path) {
        Err(ConfigError::Invalid { diagnostics, .. }) => diagnostics,
        Err(other) => panic!("{}: expected a validation error, got {other}", path.display()),
        Ok(_) => panic!("{}: expected a validation error, but it loaded", path.display()),
    }
}

#[test]
fn invalid_fixtures_point_at_file_line_col_with_a_hint() {
    let dir = Path::new("fixtures/config/invalid");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let diags = invalid_diagnostics(&path);
        assert!(!diags.is_empty(), "{}", path.display());
        for d in &diags {
            let (line, col) = d.line_col();
            let rendered = nimbus::cli::error::render(d, false);
            let loc = format!("{}:{line}:{col}", path.display());
            assert!(rendered.contains(&loc), "{}: `{loc}` missing in\n{rendered}", path.display());
            assert!(rendered.contains("help:"), "{}: no hint in\n{rendered}", path.display());
        }
    }
    assert!(n >= 15, "only {n} invalid fixtures");
}

#[test]
fn invalid_fixture_messages() {
    insta::glob!("../../fixtures/config/invalid", "*.yaml", |path| {
        let rel = Path::new("fixtures/config/invalid").join(path.file_name().unwrap());
        let rendered: String = invalid_diagnostics(&rel).iter().map(|d| nimbus::cli::error::render(d, false)).collect();
        insta::assert_snapshot!(rendered);
    });
}

#[test]
fn valid_fixtures_and_examples_load() {
    for dir in ["fixtures/config/valid", "examples/quickstart", "examples/aws-mac"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("yaml")
                && let Err(e) = config::load(&path)
            {
                panic!("{}: {}", path.display(), nimbus::cli::error::render(&e, false));
            }
        }
    }
}

#[test]
fn inline_secrets_are_masked_in_errors() {
    for (file, secret) in [
        ("fixtures/config/invalid/07-inline-secret.yaml", "MIIEsecret"),
        ("fixtures/config/invalid/25-inline-secret-block.yaml", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"),
        ("fixtures/config/invalid/25-inline-secret-block.yaml", "BEGIN OPENSSH"),
        // A secret YAML reads as a number (issue 9.4): masked, and the error points at the key, not `forge`.
        ("fixtures/config/invalid/27-inline-secret-number.yaml", "86753091234"),
    ] {
        let rendered: String = invalid_diagnostics(Path::new(file))
            .iter()
            .map(|d| format!("{d:?}{}", nimbus::cli::error::render(d, false)))
            .collect();
        assert!(!rendered.contains(secret), "{file}: secret shown in\n{rendered}");
        assert!(rendered.contains("must not be written inline"), "{rendered}");
    }
}

#[test]
fn a_numeric_inline_secret_points_at_its_key() {
    let diags = invalid_diagnostics(Path::new("fixtures/config/invalid/27-inline-secret-number.yaml"));
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].line_col(), (10, 16), "{}", diags[0].message);
    assert!(diags[0].message.contains("forge.private_key"), "{}", diags[0].message);
}

/// Issue 9.5: editors on Windows write a byte order mark; it is not part of the YAML.
#[test]
fn a_utf8_bom_is_accepted() {
    let text = std::fs::read_to_string("examples/quickstart/fleet.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fleet.yaml");
    std::fs::write(&p, format!("\u{feff}{text}")).unwrap();
    let loaded = config::load(&p).unwrap_or_else(|e| panic!("{}", nimbus::cli::error::render(&e, false)));
    assert_eq!(loaded.config.tenant, config::load(Path::new("examples/quickstart/fleet.yaml")).unwrap().config.tenant);
    // Errors still point at the right line and column after the mark.
    std::fs::write(&p, "\u{feff}version: 1\ntenant: acme\nproviders:\n  local: {type: local}\nbogus: 1\n").unwrap();
    let Err(ConfigError::Invalid { diagnostics, .. }) = config::load(&p) else { panic!("accepted") };
    assert_eq!(diagnostics[0].line_col(), (5, 1), "{}", diagnostics[0].message);
}

/// Issue 9.9: a zero connect timeout can never work.
#[test]
fn a_zero_connect_timeout_is_refused() {
    let diags = invalid_diagnostics(Path::new("fixtures/config/invalid/28-connect-timeout-zero.yaml"));
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].line_col(), (8, 20), "{}", diags[0].message);
    assert!(diags[0].help.as_deref().unwrap_or("").contains("20s"));
}

#[test]
fn several_problems_are_all_reported() {
    let text = "version: 1\ntenant: acme\nproviders:\n  local: {type: local}\npools:\n  - name: a\n    provider: nope\n    count: 1\n    machine: {os: linux, arch: arm64, image: x}\n  - name: a\n    provider: local\n    count: 1\n    machine: {os: linux, arch: arm64, image: x}\n";
    let Err(ConfigError::Invalid { diagnostics, .. }) = config::parse("f.yaml", text) else { panic!() };
    let msgs: Vec<String> = diagnostics.iter().map(|d| d.message.clone()).collect();
    assert_eq!(msgs, ["pool `a` uses provider `nope`, which is not defined", "duplicate pool name `a`"]);
    assert_eq!(diagnostics[0].line_col(), (7, 15));
    assert_eq!(diagnostics[1].line_col(), (10, 11));
}

#[test]
fn schema_matches_checked_in_file() {
    let generated = config::json_schema_text();
    let path = Path::new("schemas/fleet.schema.json");
    if std::env::var_os("NIMBUS_UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "schemas/fleet.schema.json is out of date with the code; regenerate it with `cargo run -- schema > schemas/fleet.schema.json` (or NIMBUS_UPDATE_SCHEMA=1 cargo test --test config)"
    );
}

fn yaml_to_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// The schema (the editors' view) agrees with the loader on every fixture it can judge:
/// valid files pass it; files whose only problem is a shape problem fail it.
#[test]
fn schema_judges_fixtures_like_the_loader() {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("schemas/fleet.schema.json").unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for dir in ["fixtures/config/valid", "examples/quickstart"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().and_then(|e| e.to_str()) == Some("yaml") {
                let errors: Vec<String> = validator.iter_errors(&yaml_to_json(&p)).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{}: {errors:?}", p.display());
            }
        }
    }
    // Shape problems the schema states on its own (cross references and YAML syntax are the loader's).
    for name in [
        "01-unknown-top-level-key",
        "02-unknown-pool-key",
        "03-count-wrong-type",
        "04-count-negative",
        "07-inline-secret",
        "09-invalid-tenant",
        "10-invalid-duration",
        "13-missing-machine",
        "15-unknown-provider-type",
        "16-invalid-runner-mode",
        "19-secret-both-env-and-file",
        "22-invalid-pool-name",
        "24-unknown-os",
        "25-inline-secret-block",
    ] {
        let p = Path::new("fixtures/config/invalid").join(format!("{name}.yaml"));
        assert!(!validator.is_valid(&yaml_to_json(&p)), "{name} passes the schema");
    }
}

/// Issue 11: opting an ephemeral pool out of reimaging is allowed, with a warning that says what it means.
#[test]
fn reimage_never_is_warned_about() {
    let text = "version: 1\ntenant: acme\nproviders:\n  local: {type: local}\nforge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {env: K}\n  org: acme\npools:\n  - name: ci\n    provider: local\n    count: 1\n    machine: {os: linux, arch: x86_64, image: x}\n    runner: {labels: [a], mode: ephemeral, reimage: never}\n";
    let c = config::parse("f.yaml", text).unwrap();
    let w = config::warnings(&c);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].contains("pools[0].runner.reimage: never") && w[0].contains("each job sees what the previous one left"),
        "{w:?}"
    );
    let d = nimbus::core::model::Desired::from_config(&c);
    assert!(!d.pools[0].runner.as_ref().unwrap().reimage_after_job);
    let c = config::parse("f.yaml", &text.replace(", reimage: never", "")).unwrap();
    assert!(config::warnings(&c).is_empty());
    assert!(nimbus::core::model::Desired::from_config(&c).pools[0].runner.as_ref().unwrap().reimage_after_job);
}

/// Issue 20: `pricing`, `budget` and `hosts.release` are checked with positions and hints.
#[test]
fn cost_settings_are_checked() {
    let base = "version: 1\ntenant: t\nproviders:\n  aws: {type: aws, region: us-east-1, hosts: {release: {idle-for: 2h}}}\npools:\n  - name: mac\n    provider: aws\n    count: 1\n    hosts: {release: never}\n    machine: {os: macos, arch: arm64, instance_type: mac2.metal, image: ami-1, availability_zone: us-east-1a}\n";
    let ok = nimbus::config::parse("fleet.yaml", &format!("{base}pricing:\n  mac2.metal: 0.7\nbudget:\n  max_hosts: {{mac2.metal: 3}}\n  max_commit_per_plan: \"$500\"\n")).unwrap();
    let d = nimbus::core::model::Desired::from_config(&ok);
    assert_eq!(d.price("aws", "mac2.metal"), Some(0.7));
    assert_eq!(d.budget.max_commit_per_plan, Some(500.0));
    assert_eq!(d.pools[0].host_release, Some(nimbus::core::cost::ReleasePolicy::Never));
    for (bad, want) in [
        ("budget:\n  max_commit_per_plan: lots\n", "`lots` is not an amount of money"),
        ("budget:\n  max_hosts: {mac2.metall: 3}\n", "no pool uses instance type `mac2.metall`"),
        ("pricing:\n  mac2.metal: -1\n", "not a non-negative number"),
    ] {
        let e = nimbus::config::parse("fleet.yaml", &format!("{base}{bad}")).unwrap_err();
        let text = format!("{:?}", miette::Report::new(e));
        assert!(text.contains(want), "{bad}: {text}");
        assert!(text.contains("fleet.yaml:"), "{bad}: the position is given: {text}");
    }
    let e = nimbus::config::parse("fleet.yaml", &base.replace("release: never", "release: sometimes")).unwrap_err();
    assert!(format!("{:?}", miette::Report::new(e)).contains("sometimes"));
}

/// Every forge checks its agent checksums the same way (one `agent_sha256_rules`): known platforms, 64 hex
/// digits; GitLab and Forgejo also want an https instance URL.
#[test]
fn agent_checksums_and_instance_urls_are_checked_for_every_forge() {
    let base = "version: 1\ntenant: t\nproviders:\n  local: {type: local}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {os: linux, arch: x86_64, image: img}\n    runner: {labels: [build]}\n";
    let cases = [
        (
            "forge: {type: github, app_id: 1, installation_id: 2, private_key: {env: K}, org: acme, runner_sha256: {linux-x64: nothex}}\n",
            "`forge.runner_sha256.linux-x64` is not a sha256",
        ),
        (
            "forge: {type: github, app_id: 1, installation_id: 2, private_key: {env: K}, org: acme, runner_sha256: {win-x64: nothex}}\n",
            "use linux-x64, linux-arm64, osx-x64 or osx-arm64",
        ),
        (
            "forge: {type: gitlab, url: \"https://gitlab.com\", token: {env: T}, runner_type: instance, runner_sha256: {windows-amd64: x}}\n",
            "use linux-amd64, linux-arm64, darwin-amd64 or darwin-arm64",
        ),
        (
            "forge: {type: forgejo, url: \"https://codeberg.org\", token: {env: T}, scope: {org: acme}, runner_sha256: {linux-amd64: short}}\n",
            "`forge.runner_sha256.linux-amd64` is not a sha256",
        ),
        (
            "forge: {type: forgejo, url: \"http://codeberg.org\", token: {env: T}, scope: {org: acme}}\n",
            "`http://codeberg.org` is not an https:// URL",
        ),
    ];
    for (forge, want) in cases {
        let e = nimbus::config::parse("fleet.yaml", &format!("{base}{forge}")).unwrap_err();
        let text = format!("{:?}", miette::Report::new(e));
        assert!(text.contains(want), "{forge}: {text}");
    }
}

/// Issue 24.3: bad tags are refused where they are written (line and column), with a hint; nothing runs.
#[test]
fn bad_tags_are_refused_with_their_line_and_column() {
    let long_key = "k".repeat(129);
    let long_value = "v".repeat(257);
    let text = format!(
        "version: 1\ntenant: acme\ntags:\n  nimbus:owner: me\n  team: platform\nproviders:\n  aws:\n    type: aws\n    region: us-east-1\n    tags:\n      AWS:cost: x\n      {long_key}: y\npools:\n  - name: linux\n    provider: aws\n    count: 1\n    tags:\n      cost-center: {long_value}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-1}}\n"
    );
    let Err(ConfigError::Invalid { diagnostics, .. }) = config::parse("f.yaml", &text) else { panic!("accepted") };
    let found: Vec<(String, (usize, usize))> = diagnostics.iter().map(|d| (d.message.clone(), d.line_col())).collect();
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].0.contains("`nimbus:owner` is reserved") && found[0].1 == (4, 3), "{found:#?}");
    assert!(found[1].0.contains("`AWS:cost` is reserved") && found[1].1 == (11, 7), "{found:#?}");
    assert!(found[2].0.contains("1 to 128 characters") && found[2].1 == (12, 7), "{found:#?}");
    assert!(found[3].0.contains("257 characters") && found[3].1 == (18, 20), "{found:#?}");
    assert!(diagnostics.iter().all(|d| d.help.is_some()), "every problem has a hint");
    // 50 tags per resource, nimbus's own (7) included: 43 of the user's merged over the three levels at most.
    let many = |n: usize, prefix: &str| (0..n).map(|i| format!("    {prefix}{i}: x\n")).collect::<String>();
    let fleet = |fleet_tags: usize, pool_tags: usize| {
        format!(
            "version: 1\ntenant: acme\ntags:\n{}providers:\n  local: {{type: local}}\npools:\n  - name: p\n    provider: local\n    count: 1\n    tags:\n{}    machine: {{os: linux, arch: x86_64, image: img}}\n",
            many(fleet_tags, "f").replace("    f", "  f"),
            many(pool_tags, "p").replace("    p", "      p"),
        )
    };
    assert!(config::parse("f.yaml", &fleet(20, 23)).is_ok(), "43 of the user's fit");
    let Err(ConfigError::Invalid { diagnostics, .. }) = config::parse("f.yaml", &fleet(20, 24)) else { panic!() };
    assert_eq!(diagnostics.len(), 1);
    assert!(
        diagnostics[0].message.contains("51 tags") && diagnostics[0].message.contains("AWS allows 50"),
        "{}",
        diagnostics[0].message
    );
    assert_eq!(diagnostics[0].line_col().0, 3 + 20 + 7, "at the pool's `tags` (after 20 fleet tags)");
    // A Hetzner pool takes no tags.
    let text = "version: 1\ntenant: acme\nproviders:\n  h: {type: hetzner, token: {env: HCLOUD_TOKEN}}\npools:\n  - name: p\n    provider: h\n    count: 1\n    tags: {team: a}\n    machine: {os: linux, arch: x86_64, instance_type: cx22, image: ubuntu-24.04}\n";
    let Err(ConfigError::Invalid { diagnostics, .. }) = config::parse("f.yaml", text) else { panic!("accepted") };
    assert!(diagnostics.iter().any(|d| d.message.contains("does not tag what it makes") && d.line_col() == (9, 5)));
}

/// Issue 24.1: the credential keys' rules, each where it is written.
#[test]
fn aws_credentials_are_checked() {
    let provider = |keys: &str| {
        format!("version: 1\ntenant: acme\nproviders:\n  aws:\n    type: aws\n    region: us-east-1\n{keys}pools: []\n")
    };
    let ok = provider(
        "    role_arn: arn:aws:iam::123456789012:role/nimbus\n    external_id: {env: EXT}\n    session_name: nimbus-mac\n    duration: 2h\n",
    );
    assert!(config::parse("f.yaml", &ok).is_ok(), "{:?}", config::parse("f.yaml", &ok).err());
    assert!(config::parse("f.yaml", &provider("    profile: mac-team\n    role_arn: arn:aws:iam::123456789012:role/x\n    external_id: plain-text-id\n")).is_ok());
    for (keys, message, at) in [
        ("    external_id: abc\n", "`external_id` applies to an assumed role", (7, 5)),
        ("    role_arn: arn:aws:iam::1234:role/x\n", "is not an IAM role ARN", (7, 15)),
        ("    role_arn: arn:aws:iam::123456789012:role/x\n    duration: 13h\n", "15 minutes to 12 hours", (8, 15)),
        (
            "    role_arn: arn:aws:iam::123456789012:role/x\n    session_name: \"a b\"\n",
            "not a role session name",
            (8, 19),
        ),
        (
            "    profile: p\n    role_arn: arn:aws:iam::123456789012:role/x\n    web_identity: {file: token}\n",
            "use one",
            (9, 5),
        ),
        (
            "    role_arn: arn:aws:iam::123456789012:role/x\n    web_identity: eyJhbGciOi\n",
            "must not be written inline",
            (8, 19),
        ),
    ] {
        let Err(ConfigError::Invalid { diagnostics, .. }) = config::parse("f.yaml", &provider(keys)) else {
            panic!("accepted: {keys}")
        };
        assert!(diagnostics[0].message.contains(message), "{keys}: {}", diagnostics[0].message);
        assert_eq!(diagnostics[0].line_col(), at, "{keys}: {}", diagnostics[0].message);
    }
    // The S3 state backend takes the same keys, for `backend: s3` only.
    let state = |backend: &str| {
        format!(
            "version: 1\ntenant: acme\nproviders:\n  local: {{type: local}}\nstate:\n  backend: {backend}\n  bucket: b\n  key: k\n  profile: state-team\npools: []\n"
        )
    };
    assert!(config::parse("f.yaml", &state("s3")).is_ok());
    assert!(config::parse("f.yaml", &state("local")).is_err());
}
