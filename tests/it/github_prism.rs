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

/// A loopback server that answers as GitHub does for the demand requests: an installation token, then each
/// GET with an `ETag`, and `304 Not Modified` (no body, the rate-limit headers) when `If-None-Match` carries it.
/// Prism keeps no state and never sends a 304; this server does. Returns its URL and the requests it saw
/// (`METHOD path if-none-match`).
fn etag_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let (mut length, mut inm) = (0usize, String::new());
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "if-none-match" => inm = v.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut parts = first.split_whitespace();
            let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
            log.lock().unwrap().push(format!("{method} {path} {inm}").trim_end().to_string());
            let json = if method == "POST" && path.starts_with("/app/installations/67890/access_tokens") {
                r#"{"token":"ghs_test","expires_at":"2099-01-01T00:00:00Z","permissions":{"actions":"read"}}"#
                    .to_string()
            } else if path.starts_with("/installation/repositories") {
                r#"{"total_count":1,"repositories":[{"id":1,"name":"app","full_name":"acme/app","owner":{"login":"acme"}}]}"#.to_string()
            } else if path.starts_with("/repos/acme/app/actions/runs?") {
                r#"{"total_count":1,"workflow_runs":[{"id":7}]}"#.to_string()
            } else if path.starts_with("/repos/acme/app/actions/runs/7/jobs") {
                r#"{"total_count":1,"jobs":[{"id":70,"status":"queued","labels":["self-hosted","linux"],"created_at":"2026-12-06T10:00:00Z"}]}"#.to_string()
            } else {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                continue;
            };
            let etag = format!("\"{:x}\"", json.len() * 31 + path.len());
            let limits = "x-ratelimit-limit: 5000\r\nx-ratelimit-remaining: 4990\r\n";
            let reply = if method == "GET" && inm == etag {
                format!("HTTP/1.1 304 Not Modified\r\netag: {etag}\r\n{limits}connection: close\r\n\r\n")
            } else {
                let status = if method == "POST" { "201 Created" } else { "200 OK" };
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\netag: {etag}\r\n{limits}content-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                )
            };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (url, seen)
}

/// Issue 19.2: queued jobs are read with conditional requests. Against a server that sends 304s, the second
/// read sends each path's `If-None-Match`, gets 304 for every one, counts them apart, and still finds the job
/// (from the earlier answer); the API budget is what the 304 said. Requests are counted for the metrics.
#[test]
fn conditional_requests_get_304s_and_keep_the_answer() {
    use std::sync::atomic::Ordering::Relaxed;
    let key = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("openssl makes the App's key");
    let pem = String::from_utf8(key.stdout).unwrap();
    let (url, seen) = etag_server();
    let rt = rt();
    let _in_runtime = rt.enter();
    let f = GitHubForge::new(Some(&url), 12345, 67890, &pem, "acme", None, None).unwrap();
    let counted = |outcome: &str| {
        nimbus::util::telemetry::api_requests()
            .into_iter()
            .filter(|((k, n, o), _)| k == "forge" && n == "github" && o.as_str() == outcome)
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    let ok_before = counted("ok");
    rt.block_on(async {
        let first = f.queued_jobs().await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].id, 70);
        assert_eq!((f.demand_calls.load(Relaxed), f.not_modified.load(Relaxed)), (3, 0));
        let second = f.queued_jobs().await.unwrap();
        assert_eq!(second, first, "the 304s are answered from the earlier bodies");
        assert_eq!((f.demand_calls.load(Relaxed), f.not_modified.load(Relaxed)), (6, 3), "every request a 304");
        assert_eq!(f.demand_stats(), (6, 3, 4990));
    });
    let gets: Vec<String> = seen.lock().unwrap().iter().filter(|r| r.starts_with("GET")).cloned().collect();
    assert_eq!(gets.len(), 6, "{gets:?}");
    assert!(gets[..3].iter().all(|r| !r.contains('"')), "the first reads are unconditional: {gets:?}");
    assert!(gets[3..].iter().all(|r| r.ends_with('"')), "the second reads carry If-None-Match: {gets:?}");
    assert!(counted("ok") >= ok_before + 6, "requests are counted for the metrics");
}
