//! Contract tests: every request the GitHub forge makes is sent to Prism
//! serving GitHub's official OpenAPI description, which validates it
//! (path, method, headers, body) and answers from the spec's examples.
//! The fake forge used in scenario tests stands for exactly these requests.

use crate::common::peer;
use nimbus::forges::Forge;
use nimbus::forges::fake::FakeForge;
use nimbus::forges::github::{GitHubForge, rate_limit_wait};

/// The request shapes covered here; the fake forge records the same names.
const COVERED: &[&str] = &[
    "GET /orgs/{org}/actions/runners",
    "POST /orgs/{org}/actions/runners/registration-token",
    "GET /orgs/{org}/actions/runner-groups/{runner_group_id}",
    "POST /orgs/{org}/actions/runners/generate-jitconfig",
    "DELETE /orgs/{org}/actions/runners/{runner_id}",
    "PUT /orgs/{org}/actions/runners/{runner_id}/labels",
    "GET /installation/repositories",
    "GET /repos/{owner}/{repo}/actions/runs?status=queued",
    "GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs",
];

fn forge() -> Option<GitHubForge> {
    let url = peer("NIMBUS_PRISM_URL", "Prism (GitHub API)")?;
    let pem = std::fs::read_to_string(std::env::var("NIMBUS_TEST_APP_KEY").expect("NIMBUS_TEST_APP_KEY")).unwrap();
    Some(
        GitHubForge::new(Some(&url), 12345, 67890, &pem, "acme", Some(7), Some("file:///runner-{os}-{arch}.tgz"))
            .unwrap(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn every_github_request_validates_against_the_spec() {
    let rt = rt();
    let _in_runtime = rt.enter();
    let Some(f) = forge() else { return };
    rt.block_on(async {
        // GitHub App auth: a JWT is exchanged for an installation token first (POST /app/installations/{id}/access_tokens).
        let runners = f.list_runners("acme").await.expect("GET runners validates");
        // The spec's example runners are not named for any tenant.
        assert!(runners.is_empty());
        let reg =
            f.register("nimbus.acme.mac.0", &["macOS".into()], false).await.expect("registration-token validates");
        assert_eq!(reg.url.as_deref(), Some("https://github.com/acme"));
        assert!(!reg.ephemeral && reg.runner_id.is_none());
        // The forge is configured with runner group 7: a persistent runner joins it by name, looked up with
        // GET /orgs/{org}/actions/runner-groups/{id} (the spec's example group).
        assert!(reg.group.as_deref().is_some_and(|g| !g.is_empty()), "{:?}", reg.group);
        assert!(!reg.secret.expose().is_empty());
        assert_eq!(format!("{:?}", reg.secret), "Secret(<redacted>)");
        let jit = f.register("nimbus.acme.mac.1", &["macOS".into()], true).await.expect("generate-jitconfig validates");
        assert!(jit.ephemeral && jit.runner_id.is_some() && !jit.secret.expose().is_empty());
        f.delete_runner(42).await.expect("DELETE runner validates");
        f.set_labels(42, &["macOS".into(), "xcode-16".into()]).await.expect("PUT labels validates");
    });
}

/// Issue 19: demand. The installation's repositories, each one's queued workflow runs, then their jobs, all
/// paginated and validated against GitHub's spec; asked again, each request carries `If-None-Match` with the
/// last ETag (a 304 would be answered from the cache and would not count against the rate limit).
#[test]
fn queued_jobs_requests_validate_against_the_spec() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = rt();
    let _in_runtime = rt.enter();
    let Some(f) = forge() else { return };
    rt.block_on(async {
        f.queued_jobs().await.expect("installation repositories, runs and jobs validate");
        let first = f.demand_calls.load(Relaxed);
        assert!(first >= 3, "repositories, runs and jobs were read: {first}");
        f.queued_jobs().await.expect("conditional requests validate");
        assert_eq!(f.demand_calls.load(Relaxed), 2 * first, "the same requests again");
        // The configured repositories instead of the installation's.
        let f = forge().unwrap().with_repos(Some(vec!["hello-world".into()]));
        f.queued_jobs().await.expect("a configured repository validates");
    });
}

#[test]
fn prism_rejects_what_the_spec_does_not_allow() {
    let rt = rt();
    let _in_runtime = rt.enter();
    let Some(f) = forge() else { return };
    // The spec allows at most 100 labels: the contract check has teeth.
    let too_many: Vec<String> = (0..101).map(|i| format!("l{i}")).collect();
    let e = rt.block_on(async { f.set_labels(42, &too_many).await.unwrap_err() }).to_string();
    assert!(e.contains("422") || e.contains("400"), "{e}");
}

#[test]
fn the_fake_forge_stands_only_for_covered_requests() {
    let fake = FakeForge::new("file:///x");
    rt().block_on(async {
        fake.list_runners("t").await.unwrap();
        fake.register("nimbus.t.p.0", &[], false).await.unwrap();
        let id = fake.register("nimbus.t.p.1", &["a".into()], true).await.unwrap().runner_id.expect("a JIT runner");
        fake.set_labels(id, &["b".into()]).await.unwrap();
        fake.delete_runner(id).await.unwrap();
        fake.queued_jobs().await.unwrap();
    });
    for c in fake.calls() {
        assert!(COVERED.contains(&c.as_str()), "{c} is not covered by a contract test");
    }
}

#[test]
fn rate_limit_headers_are_honoured() {
    use http::{HeaderMap, HeaderValue, StatusCode};
    let mut h = HeaderMap::new();
    assert_eq!(rate_limit_wait(StatusCode::OK, &h), None);
    h.insert("retry-after", HeaderValue::from_static("7"));
    assert_eq!(rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &h), Some(std::time::Duration::from_secs(7)));
    let mut h = HeaderMap::new();
    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 30;
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    h.insert("x-ratelimit-reset", HeaderValue::from_str(&reset.to_string()).unwrap());
    let w = rate_limit_wait(StatusCode::FORBIDDEN, &h).unwrap();
    assert!(w.as_secs() >= 29 && w.as_secs() <= 30, "{w:?}");
    // A plain 403 (no rate-limit headers) is not waited on.
    assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &HeaderMap::new()), None);
}

/// The CLI with a GitHub App forge pointed at Prism: the App key is read from
/// its file, discovery lists runners through the validated API, and neither
/// the key nor a token appears in any output.
#[test]
fn cli_plans_with_the_github_forge() {
    let Some(url) = peer("NIMBUS_PRISM_URL", "Prism (GitHub API)") else { return };
    let key_path = std::env::var("NIMBUS_TEST_APP_KEY").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!(
        "version: 1\ntenant: acme\nproviders:\n  local: {{type: local}}\nforge:\n  type: github\n  app_id: 12345\n  installation_id: 67890\n  private_key: {{file: {key_path}}}\n  org: acme\n  api_url: {url}\npools:\n  - name: p\n    provider: local\n    count: 1\n    machine: {{os: linux, arch: x86_64, image: img}}\n    runner: {{labels: [linux]}}\n"
    );
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    let mut all = String::new();
    for args in [vec!["plan", "--json"], vec!["plan", "--markdown"], vec!["--log-format", "json", "plan"]] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(&args)
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        all.push_str(&String::from_utf8_lossy(&o.stdout));
        all.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    assert!(all.contains("register_runner"), "{all}");
    let key = std::fs::read_to_string(&key_path).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!all.contains(line), "the App key leaked");
    }
    // Prism answers with the spec's example tokens.
    for token in
        ["ghs_16C7e42F292c6912E7710c838347Ae178B4a", "LLBF3JGZDX3P5PMEXLND6TS6FCWO6", "AABF3JGZDX3P5PMEXLND6TS6FCWO6"]
    {
        assert!(!all.contains(token), "a token leaked");
    }
}
