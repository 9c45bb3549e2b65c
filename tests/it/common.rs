//! Shared helpers for tests that need a peer (moto, sshd, Prism). A missing
//! peer skips the test on a developer's machine, and fails it when
//! `NIMBUS_REQUIRE_PEERS=1` (as `scripts/test.sh` and CI set).

use std::path::Path;
use std::process::{Command, Output, Stdio};

pub fn require_peers() -> bool {
    std::env::var("NIMBUS_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// The peer's URL from `var`, or `None` (skip) when absent outside CI.
/// A peer that is not a server (a tool path): its variable's value, or a skip (a failure when peers are required).
pub fn peer_value(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) => Some(v),
        Err(_) if require_peers() => {
            panic!("{what} is required (NIMBUS_REQUIRE_PEERS=1) but {var} is not set; run `bash scripts/test.sh`")
        }
        Err(_) => {
            eprintln!("skipping: {what} is not set up ({var} unset); `bash scripts/test.sh` sets it up");
            None
        }
    }
}

pub fn peer(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => {
            // Tests talk to loopback only.
            let host = url.split("://").nth(1).unwrap_or(&url);
            assert!(host.starts_with("127.") || host.starts_with("localhost"), "{var}={url} is not on loopback");
            Some(url)
        }
        Err(_) if require_peers() => {
            panic!("{what} is required (NIMBUS_REQUIRE_PEERS=1) but {var} is not set; run `bash scripts/test.sh`")
        }
        Err(_) => {
            eprintln!("skipping: {what} is not running ({var} unset); `bash scripts/test.sh` starts it");
            None
        }
    }
}

/// Environment that points the AWS SDK at moto, never at AWS.
pub fn aws_env(moto: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL_EC2", moto.to_string()),
        ("AWS_ENDPOINT_URL", moto.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}

pub fn nimbus_env(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1").env_remove("AWS_PROFILE").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("nimbus runs")
}

pub fn text(o: &Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A tenant name no other test uses.
pub fn unique_tenant(prefix: &str) -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{:x}", n % 0xffff_ffff)
}

/// A runner agent tarball whose scripts record how they were called: its URL template and the sha256 of the
/// `linux-x64` download.
pub fn fake_runner(dir: &Path) -> (String, String) {
    let src = dir.join("runner-src");
    std::fs::create_dir_all(&src).unwrap();
    let config = r#"#!/bin/sh
# records: name, labels, url, and the token (a real runner keeps its credentials too). It takes a moment, as a
# real one does, so that `ps` can see it running.
sleep 0.3
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift;;
    --labels) labels="$2"; shift;;
    --url) url="$2"; shift;;
    --token) echo "the token must not be on the command line" >&2; exit 9;;
  esac
  shift
done
token="$ACTIONS_RUNNER_INPUT_TOKEN"
printf '%s\n%s\n%s\n' "$name" "$labels" "$url" > .runner-config
printf '%s' "$token" > .credentials
"#;
    std::fs::write(src.join("config.sh"), config).unwrap();
    std::fs::write(src.join("svc.sh"), "#!/bin/sh\necho \"$1\" >> .service\n").unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\n[ $# -eq 0 ] || { echo \"no arguments expected: the JIT config is in the environment\" >&2; exit 9; }\nprintf '%s' \"$ACTIONS_RUNNER_INPUT_JITCONFIG\" > .jitconfig\n").unwrap();
    for f in ["config.sh", "svc.sh", "run.sh"] {
        let p = src.join(f);
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&p, perm).unwrap();
    }
    let tgz = dir.join("runner-{os}-{arch}.tgz");
    let real = dir.join("runner-linux-x64.tgz");
    let ok = std::process::Command::new("tar").arg("czf").arg(&real).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(ok.success());
    let hex = nimbus::core::model::sha256_hex(&std::fs::read(&real).unwrap());
    (format!("file://{}", tgz.display()), hex)
}

/// The machine side of registration: each runner the fake runner's config.sh
/// configured under `runner_dir` shows up on the fake forge (as GitHub would).
pub fn runner_comes_online(forge: &nimbus::forges::fake::FakeForge, runner_dir: &Path) {
    let cfg = runner_dir.join(".runner-config");
    let Ok(text) = std::fs::read_to_string(&cfg) else { return };
    let token = std::fs::read_to_string(runner_dir.join(".credentials")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let labels: Vec<String> = lines[1].split(',').filter(|l| !l.is_empty()).map(str::to_string).collect();
    forge.runner_configured(&token, lines[0], &labels).unwrap();
    std::fs::remove_file(cfg).unwrap();
}

/// Points this test process's AWS SDK at moto, once (same values for every test).
pub fn use_moto_env(moto: &str) {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        for (k, v) in aws_env(moto) {
            // SAFETY: set once, before any AWS client exists in this process, with the same values for all tests.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

/// An EC2 client for moto, to plant and inspect resources behind nimbus's back (after `use_moto_env`).
pub async fn sdk() -> aws_sdk_ec2::Client {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    aws_sdk_ec2::Client::new(&cfg)
}

/// `2026-12-06T20:00:00Z` for epoch seconds.
pub fn rfc3339(epoch: i64) -> String {
    chrono::DateTime::from_timestamp(epoch, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Held by every test that uses the IAM-enforcing moto, for its whole run: `/moto-api/reset-auth` lets the next
/// few requests through unauthenticated, whoever sends them, so one test's setup must never let another test's
/// requests through (nor use up its allowance).
pub fn iam_moto_lock() -> std::sync::MutexGuard<'static, ()> {
    static IAM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    IAM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A percent-encoded query or form value, decoded (an escape that is not one is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(h) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
