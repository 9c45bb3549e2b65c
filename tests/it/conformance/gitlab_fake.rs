//! A stateful GitLab on loopback (no official API description exists to serve, and no GitLab can be installed
//! here), with a fake `gitlab-runner` that talks to it the way the real agent does. Every route it serves,
//! and the documentation it follows (GitLab's `doc/api/*.md` and gitlab-runner's source, as summarised in
//! `shared/protocols/forges.md`):
//!
//! | route | follows | the fake |
//! | --- | --- | --- |
//! | `POST /api/v4/user/runners` | users.md "Create a runner linked to a user" | `runner_type` + `group_id`/`project_id`, `description`, `tag_list`, `run_untagged`, `locked`; 201 `{id, token: "glrt-…", token_expires_at}`; 403 without the token |
//! | `GET /api/v4/groups/:id/runners`, `/projects/:id/runners`, `/runners/all` | runners.md "List group's / project's / all runners" | `per_page`, `page`, `X-Next-Page`/`X-Total`; runner `id, description, paused, status, online, runner_type` (no tags, as GitLab) |
//! | `GET /api/v4/runners/:id` | runners.md "Get runner's details" | adds `tag_list`; 404 when gone |
//! | `PUT /api/v4/runners/:id` | runners.md "Update runner's details" | `tag_list`, `paused` |
//! | `DELETE /api/v4/runners/:id` | runners.md "Delete a runner" | 204; 404 when gone |
//! | `GET /api/v4/runners/:id/jobs?status=running` | runners.md "List jobs processed by a runner" | the runner's running jobs |
//! | `GET /api/v4/projects/:id/jobs?scope[]=pending` | jobs.md "List project jobs" | pending jobs with `tag_list`, `created_at` |
//! | `POST /api/v4/runners/verify` | runners.md "Verify authentication for a registered runner" (what `register` calls) | `{token, system_id}`: 200, the runner is contacted (online); 403 for an unknown token |
//! | `POST /api/v4/jobs/request` | gitlab-runner's job request (network/gitlab.go) | `{token}`: 201 with the oldest pending job whose tags the runner has (it becomes running); 204 when none |
//! | `PUT /api/v4/jobs/:id` | gitlab-runner's job update | `{token, state: success\|failed}`: the job ends |
//!
//! Every request needs `PRIVATE-TOKEN` (API) or a runner token (agent routes). `throttle(n)` answers the next
//! `n` API requests with 429 `Retry Later` and `Retry-After: 0`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "glpat-test-token";

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: u64,
    pub description: String,
    pub tags: Vec<String>,
    pub token: String,
    pub contacted: bool,
    pub paused: bool,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub project: u64,
    pub tags: Vec<String>,
    pub status: &'static str,
    pub runner: Option<u64>,
    /// How long the fake agent runs it.
    pub seconds: u32,
}

#[derive(Default)]
struct State {
    next: u64,
    runners: BTreeMap<u64, Runner>,
    jobs: BTreeMap<u64, Job>,
    throttle: u32,
    requests: BTreeMap<String, usize>,
}

#[derive(Clone)]
pub struct GitlabFake {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl GitlabFake {
    pub fn start() -> GitlabFake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { next: 100, ..Default::default() }));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        GitlabFake { url, state }
    }
    pub fn throttle(&self, n: u32) {
        self.state.lock().unwrap().throttle = n;
    }
    pub fn requests(&self, route: &str) -> usize {
        self.state.lock().unwrap().requests.get(route).copied().unwrap_or(0)
    }
    pub fn runners(&self) -> Vec<Runner> {
        self.state.lock().unwrap().runners.values().cloned().collect()
    }
    /// A runner made behind nimbus's back (another tenant's, or by hand).
    pub fn add_runner(&self, description: &str) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next += 1;
        let id = st.next;
        st.runners.insert(
            id,
            Runner {
                id,
                description: description.into(),
                tags: vec![],
                token: format!("glrt-x{id}"),
                contacted: true,
                paused: false,
            },
        );
        id
    }
    /// A pipeline job waiting for a runner with these tags; its id.
    pub fn queue_job(&self, project: u64, tags: &[&str]) -> u64 {
        self.queue_job_for(project, tags, 1)
    }
    /// A job the fake agent runs for `seconds`.
    pub fn queue_job_for(&self, project: u64, tags: &[&str], seconds: u32) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next += 1;
        let id = st.next;
        st.jobs.insert(
            id,
            Job {
                id,
                project,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                status: "pending",
                runner: None,
                seconds,
            },
        );
        id
    }
    pub fn job(&self, id: u64) -> Option<Job> {
        self.state.lock().unwrap().jobs.get(&id).cloned()
    }
    /// Ends a running job (as the agent would).
    pub fn finish_job(&self, id: u64) {
        if let Some(j) = self.state.lock().unwrap().jobs.get_mut(&id) {
            j.status = "success";
        }
    }
}

fn runner_json(r: &Runner, details: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": r.id, "description": r.description, "name": "gitlab-runner", "paused": r.paused, "active": !r.paused,
        "is_shared": false, "runner_type": "group_type",
        "online": r.contacted, "status": if r.contacted { "online" } else { "never_contacted" },
    });
    if details {
        v["tag_list"] = serde_json::json!(r.tags);
        v["run_untagged"] = serde_json::json!(false);
        v["locked"] = serde_json::json!(true);
    }
    v
}

fn serve(mut stream: std::net::TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let (mut length, mut private_token) = (0usize, String::new());
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "private-token" => private_token = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let q: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.replace("%5B%5D", "[]"), v.to_string()))
        .collect();
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let seg: Vec<&str> = path.trim_start_matches("/api/v4/").split('/').collect();
    let route = format!(
        "{method} /{}",
        seg.iter()
            .map(|s| if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() { ":id" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    );
    let agent_route = matches!(route.as_str(), "POST /runners/verify" | "POST /jobs/request" | "PUT /jobs/:id");
    let (status, answer, extra): (u16, serde_json::Value, String) = {
        let mut st = state.lock().unwrap();
        *st.requests.entry(route.clone()).or_default() += 1;
        if !agent_route && st.throttle > 0 {
            st.throttle -= 1;
            (429, serde_json::json!({"message": "Retry later"}), "retry-after: 0\r\n".into())
        } else if !agent_route && private_token != TOKEN {
            (401, serde_json::json!({"message": "401 Unauthorized"}), String::new())
        } else {
            handle(&mut st, &method, &seg, &get, &body)
        }
    };
    let text = if status == 204 { String::new() } else { answer.to_string() };
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(reply.as_bytes());
}

type Get<'a> = dyn Fn(&str) -> Option<String> + 'a;

fn paged(items: Vec<serde_json::Value>, get: &Get) -> (u16, serde_json::Value, String) {
    let per: usize = get("per_page").and_then(|v| v.parse().ok()).unwrap_or(20).clamp(1, 100);
    let page: usize = get("page").and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let total = items.len();
    let next = if page * per < total { (page + 1).to_string() } else { String::new() };
    let slice: Vec<_> = items.into_iter().skip((page - 1) * per).take(per).collect();
    (200, serde_json::json!(slice), format!("x-next-page: {next}\r\nx-total: {total}\r\nx-page: {page}\r\n"))
}

fn handle(
    st: &mut State,
    method: &str,
    seg: &[&str],
    get: &Get,
    body: &serde_json::Value,
) -> (u16, serde_json::Value, String) {
    let none = String::new();
    let id_of = |s: &str| s.parse::<u64>().ok();
    match (method, seg) {
        ("POST", ["user", "runners"]) => {
            let kind = body["runner_type"].as_str().unwrap_or_default();
            let ok = match kind {
                "instance_type" => true,
                "group_type" => body["group_id"].is_u64(),
                "project_type" => body["project_id"].is_u64(),
                _ => false,
            };
            if !ok {
                return (400, serde_json::json!({"message": "runner_type and its id are required"}), none);
            }
            st.next += 1;
            let id = st.next;
            let token = format!("glrt-{id:020}");
            let tags = body["tag_list"]
                .as_array()
                .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            st.runners.insert(
                id,
                Runner {
                    id,
                    description: body["description"].as_str().unwrap_or_default().into(),
                    tags,
                    token: token.clone(),
                    contacted: false,
                    paused: false,
                },
            );
            (201, serde_json::json!({"id": id, "token": token, "token_expires_at": null}), none)
        }
        ("GET", ["groups", _, "runners"]) | ("GET", ["projects", _, "runners"]) | ("GET", ["runners", "all"]) => {
            let items = st.runners.values().map(|r| runner_json(r, false)).collect();
            paged(items, get)
        }
        ("GET", ["runners", id]) => match id_of(id).and_then(|i| st.runners.get(&i)) {
            Some(r) => (200, runner_json(r, true), none),
            None => (404, serde_json::json!({"message": "404 Not found"}), none),
        },
        ("PUT", ["runners", id]) => match id_of(id).and_then(|i| st.runners.get_mut(&i)) {
            Some(r) => {
                if let Some(t) = body["tag_list"].as_array() {
                    r.tags = t.iter().filter_map(|t| t.as_str().map(str::to_string)).collect();
                }
                if let Some(p) = body["paused"].as_bool() {
                    r.paused = p;
                }
                (200, runner_json(r, true), none)
            }
            None => (404, serde_json::json!({"message": "404 Not found"}), none),
        },
        ("DELETE", ["runners", id]) => match id_of(id).and_then(|i| st.runners.remove(&i)) {
            Some(_) => (204, serde_json::Value::Null, none),
            None => (404, serde_json::json!({"message": "404 Not found"}), none),
        },
        ("GET", ["runners", id, "jobs"]) => {
            let rid = id_of(id);
            let want = get("status");
            let items: Vec<_> = st
                .jobs
                .values()
                .filter(|j| j.runner == rid && want.as_deref().is_none_or(|w| w == j.status))
                .map(|j| serde_json::json!({"id": j.id, "status": j.status, "tag_list": j.tags}))
                .collect();
            paged(items, get)
        }
        ("GET", ["projects", p, "jobs"]) => {
            let pid = id_of(p);
            let items: Vec<_> = st
                .jobs
                .values()
                .filter(|j| Some(j.project) == pid && j.status == "pending")
                .map(|j| serde_json::json!({"id": j.id, "status": j.status, "tag_list": j.tags, "created_at": "2026-12-06T10:00:00Z", "runner": null}))
                .collect();
            paged(items, get)
        }
        ("POST", ["runners", "verify"]) => {
            let token = body["token"].as_str().unwrap_or_default();
            match st.runners.values_mut().find(|r| r.token == token) {
                Some(r) if body["system_id"].is_string() => {
                    r.contacted = true;
                    (200, serde_json::json!({"id": r.id, "token": r.token, "token_expires_at": null}), none)
                }
                _ => (403, serde_json::json!({"message": "403 Forbidden"}), none),
            }
        }
        ("POST", ["jobs", "request"]) => {
            let token = body["token"].as_str().unwrap_or_default();
            let Some(r) = st.runners.values().find(|r| r.token == token).cloned() else {
                return (403, serde_json::json!({"message": "403 Forbidden"}), none);
            };
            if r.paused {
                return (204, serde_json::Value::Null, none);
            }
            let job = st.jobs.values_mut().find(|j| j.status == "pending" && j.tags.iter().all(|t| r.tags.contains(t)));
            match job {
                Some(j) => {
                    j.status = "running";
                    j.runner = Some(r.id);
                    (
                        201,
                        serde_json::json!({"id": j.id, "token": format!("job-token-{}", j.id), "seconds": j.seconds}),
                        none,
                    )
                }
                None => (204, serde_json::Value::Null, none),
            }
        }
        ("PUT", ["jobs", id]) => {
            let token = body["token"].as_str().unwrap_or_default();
            let known = st.runners.values().any(|r| r.token == token);
            match id_of(id).and_then(|i| st.jobs.get_mut(&i)) {
                Some(j) if known => {
                    j.status = if body["state"] == "failed" { "failed" } else { "success" };
                    (200, serde_json::json!({}), none)
                }
                _ => (403, serde_json::json!({"message": "403 Forbidden"}), none),
            }
        }
        _ => (404, serde_json::json!({"message": format!("404 no route {method} /{}", seg.join("/"))}), none),
    }
}

/// A fake `gitlab-runner` (a shell script, as a file:// download) that does what the real one does with the
/// server: `register` verifies its token (`POST /runners/verify`, going online) and writes `config.toml`;
/// `run`/`run-single` ask for jobs (`POST /jobs/request`), run each for the job's `seconds` (a field only the
/// fake sends), and
/// report success (`PUT /jobs/:id`); `run` gives up after a few seconds without work, `run-single
/// --max-builds 1` after one job. Returns the URL template and the sha256 of the `linux-amd64` download.
pub fn fake_agent(dir: &std::path::Path) -> (String, String) {
    let script = r#"#!/bin/sh
# A stand-in for gitlab-runner that talks to its server as the real one does.
cmd="$1"; shift
config=""
while [ $# -gt 0 ]; do
  case "$1" in --config|-c) config="$2"; shift;; esac
  shift
done
[ -n "$config" ] || config="$(pwd)/config.toml"
case "$cmd" in
  register)
    case " $* $(cat /proc/self/cmdline 2>/dev/null | tr '\0' ' ') " in *glrt-*) echo "the token is on the command line" >&2; exit 9;; esac
    curl -fsS -X POST "$CI_SERVER_URL/api/v4/runners/verify" -H 'content-type: application/json' \
      -d "{\"token\":\"$CI_SERVER_TOKEN\",\"system_id\":\"s_nimbusfake\"}" >/dev/null || exit 3
    printf 'concurrent = 1\n[[runners]]\n  name = "%s"\n  url = "%s"\n  token = "%s"\n  executor = "%s"\n' \
      "$RUNNER_NAME" "$CI_SERVER_URL" "$CI_SERVER_TOKEN" "$RUNNER_EXECUTOR" > "$config"
    ;;
  run|run-single)
    url=$(sed -n 's/^  url = "\(.*\)"$/\1/p' "$config"); token=$(sed -n 's/^  token = "\(.*\)"$/\1/p' "$config")
    left=${FAKE_RUN_POLLS:-150}; builds=0
    while [ "$left" -gt 0 ]; do
      resp=$(curl -fsS -X POST "$url/api/v4/jobs/request" -H 'content-type: application/json' -d "{\"token\":\"$token\"}")
      job=$(echo "$resp" | sed -n 's/.*"id":\([0-9]*\).*/\1/p'); secs=$(echo "$resp" | sed -n 's/.*"seconds":\([0-9]*\).*/\1/p')
      if [ -n "$job" ]; then
        sleep "${secs:-1}"
        curl -fsS -X PUT "$url/api/v4/jobs/$job" -H 'content-type: application/json' -d "{\"token\":\"$token\",\"state\":\"success\"}" >/dev/null
        builds=$((builds + 1))
        [ "$cmd" = run-single ] && exit 0
      fi
      left=$((left - 1)); sleep 0.1
    done
    ;;
  start|restart) echo "fake gitlab-runner: no service manager here" >&2; exit 1;;
  unregister|install|stop|uninstall) ;;
  *) echo "fake gitlab-runner: unknown command $cmd" >&2; exit 2;;
esac
"#;
    let path = dir.join("gitlab-runner-linux-amd64");
    std::fs::write(&path, script).unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&path, perm).unwrap();
    let sum = nimbus::core::model::sha256_hex(&std::fs::read(&path).unwrap());
    (format!("file://{}/gitlab-runner-{{os}}-{{arch}}", dir.display()), sum)
}
