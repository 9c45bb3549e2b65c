//! A stateful Hetzner Cloud API on loopback, for the provider conformance suite and scenarios (Prism, serving
//! the official description, keeps no state). Every request shape it accepts is listed here, and
//! `hetzner_prism::every_hetzner_request_validates_against_the_spec` sends the same shapes to Prism:
//!
//! | route | follows (API reference) | the fake |
//! | --- | --- | --- |
//! | `GET /servers?label_selector&page&per_page` | Servers → Get all Servers | label selector `k=v` (comma-separated, all must hold), pages with `meta.pagination.next_page`; can be told to ignore the selector |
//! | `POST /servers` | Servers → Create a Server | `name` unique (409 `uniqueness_error`), `server_type`, `image`, `location`, `labels`, `ssh_keys`, `user_data`, `start_after_create`; returns `server` and its `action` |
//! | `GET /servers/{id}` | Servers → Get a Server | 404 `not_found` when gone |
//! | `DELETE /servers/{id}` | Servers → Delete a Server | returns the `action`; 404 when gone |
//! | `POST /servers/{id}/actions/rebuild` | Server Actions → Rebuild a Server from an Image | `image`; returns the `action` |
//! | `GET /actions/{id}` | Actions → Get an Action | `running` for two polls, then `success` (the server turns `running`) |
//!
//! Every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`; `throttle(n)` answers
//! the next `n` requests with 429 `rate_limit_exceeded`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    next_id: u64,
    servers: BTreeMap<u64, serde_json::Value>,
    /// action id → (polls left, server id, what it does: create/delete/rebuild)
    actions: BTreeMap<u64, (u32, u64, &'static str)>,
    ignore_selector: bool,
    throttle: u32,
    requests: BTreeMap<String, usize>,
    remaining: i64,
}

#[derive(Clone)]
pub struct HetznerFake {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl HetznerFake {
    pub fn start() -> HetznerFake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { next_id: 1000, remaining: 3600, ..Default::default() }));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        HetznerFake { url, state }
    }

    pub fn ignore_selector(&self, on: bool) {
        self.state.lock().unwrap().ignore_selector = on;
    }
    pub fn throttle(&self, n: u32) {
        self.state.lock().unwrap().throttle = n;
    }
    /// Requests seen for a route (`GET /servers`, `POST /servers`, …).
    pub fn requests(&self, route: &str) -> usize {
        self.state.lock().unwrap().requests.get(route).copied().unwrap_or(0)
    }
    /// Plants a server with these labels (behind nimbus's back); its id.
    pub fn plant(&self, name: &str, labels: serde_json::Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        let id = st.next_id;
        st.servers.insert(id, server(id, name, "cx22", "ubuntu-24.04", "fsn1", labels, "running"));
        id
    }
    pub fn exists(&self, id: &str) -> bool {
        id.parse::<u64>().is_ok_and(|i| self.state.lock().unwrap().servers.contains_key(&i))
    }
    pub fn server(&self, id: &str) -> Option<serde_json::Value> {
        id.parse::<u64>().ok().and_then(|i| self.state.lock().unwrap().servers.get(&i).cloned())
    }
}

fn server(
    id: u64,
    name: &str,
    t: &str,
    image: &str,
    location: &str,
    labels: serde_json::Value,
    status: &str,
) -> serde_json::Value {
    serde_json::json!({
        "id": id, "name": name, "status": status, "created": "2026-12-06T12:00:00+00:00",
        "labels": labels,
        "server_type": {"name": t}, "image": {"name": image},
        "datacenter": {"location": {"name": location}},
        "public_net": {"ipv4": {"ip": "198.51.100.7"}}, "private_net": []
    })
}

fn error(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code, "message": message}})
}

fn action(id: u64, command: &str, status: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "command": command, "status": status, "progress": 0, "error": null})
}

fn selected(labels: &serde_json::Value, selector: &str) -> bool {
    selector.split(',').filter(|c| !c.is_empty()).all(|cond| match cond.split_once('=') {
        Some((k, v)) => labels.get(k).and_then(|x| x.as_str()) == Some(v),
        None => labels.get(cond).is_some(),
    })
}

fn serve(mut stream: std::net::TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.strip_prefix("/v1").unwrap_or(path);
    let q: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), crate::common::percent_decode(v)))
        .collect();
    let route = {
        let shape: Vec<&str> = path
            .split('/')
            .map(|s| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { "{id}" } else { s })
            .collect();
        format!("{method} {}", shape.join("/"))
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let (status, answer) = {
        let mut st = state.lock().unwrap();
        *st.requests.entry(route.clone()).or_default() += 1;
        st.remaining = (st.remaining - 1).max(0);
        if st.throttle > 0 {
            st.throttle -= 1;
            (429, error("rate_limit_exceeded", "limit of 3600 requests per hour reached"))
        } else {
            handle(&mut st, method, path, &q, &body)
        }
    };
    let remaining = state.lock().unwrap().remaining;
    let text = answer.to_string();
    let reset = chrono::Utc::now().timestamp() + 1;
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nratelimit-limit: 3600\r\nratelimit-remaining: {remaining}\r\nratelimit-reset: {reset}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(reply.as_bytes());
}

fn handle(
    st: &mut State,
    method: &str,
    path: &str,
    q: &BTreeMap<String, String>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, seg.as_slice()) {
        ("GET", ["servers"]) => {
            let selector = q.get("label_selector").cloned().unwrap_or_default();
            let per: usize = q.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(25).clamp(1, 50);
            let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
            let all: Vec<serde_json::Value> = st
                .servers
                .values()
                .filter(|s| st.ignore_selector || selected(&s["labels"], &selector))
                .cloned()
                .collect();
            let total = all.len();
            let items: Vec<_> = all.into_iter().skip((page - 1) * per).take(per).collect();
            let last = total.div_ceil(per).max(1);
            let next = if page < last { serde_json::json!(page + 1) } else { serde_json::Value::Null };
            (
                200,
                serde_json::json!({"servers": items, "meta": {"pagination": {"page": page, "per_page": per, "previous_page": null, "next_page": next, "last_page": last, "total_entries": total}}}),
            )
        }
        ("POST", ["servers"]) => {
            let name = body["name"].as_str().unwrap_or_default().to_string();
            if name.is_empty() || body["server_type"].as_str().is_none() || body["image"].as_str().is_none() {
                return (422, error("invalid_input", "name, server_type and image are required"));
            }
            if st.servers.values().any(|s| s["name"] == name.as_str()) {
                return (409, error("uniqueness_error", "server name is already used"));
            }
            st.next_id += 1;
            let id = st.next_id;
            let s = server(
                id,
                &name,
                body["server_type"].as_str().unwrap_or_default(),
                body["image"].as_str().unwrap_or_default(),
                body["location"].as_str().unwrap_or("fsn1"),
                body["labels"].clone(),
                "initializing",
            );
            st.servers.insert(id, s.clone());
            st.next_id += 1;
            let aid = st.next_id;
            st.actions.insert(aid, (2, id, "create_server"));
            (
                201,
                serde_json::json!({"server": s, "action": action(aid, "create_server", "running"), "next_actions": [], "root_password": null}),
            )
        }
        ("GET", ["servers", id]) => match id.parse::<u64>().ok().and_then(|i| st.servers.get(&i)) {
            Some(s) => (200, serde_json::json!({"server": s})),
            None => (404, error("not_found", "server not found")),
        },
        ("DELETE", ["servers", id]) => match id.parse::<u64>().ok().filter(|i| st.servers.contains_key(i)) {
            Some(i) => {
                st.servers.get_mut(&i).unwrap()["status"] = serde_json::json!("deleting");
                st.next_id += 1;
                let aid = st.next_id;
                st.actions.insert(aid, (2, i, "delete_server"));
                (200, serde_json::json!({"action": action(aid, "delete_server", "running")}))
            }
            None => (404, error("not_found", "server not found")),
        },
        ("POST", ["servers", id, "actions", "rebuild"]) => match id
            .parse::<u64>()
            .ok()
            .filter(|i| st.servers.contains_key(i))
        {
            Some(i) => {
                let s = st.servers.get_mut(&i).unwrap();
                s["status"] = serde_json::json!("rebuilding");
                s["image"] = serde_json::json!({"name": body["image"].as_str().unwrap_or_default()});
                st.next_id += 1;
                let aid = st.next_id;
                st.actions.insert(aid, (2, i, "rebuild_server"));
                (201, serde_json::json!({"action": action(aid, "rebuild_server", "running"), "root_password": null}))
            }
            None => (404, error("not_found", "server not found")),
        },
        ("GET", ["actions", id]) => {
            match id.parse::<u64>().ok().and_then(|i| st.actions.get(&i).copied().map(|a| (i, a))) {
                Some((aid, (left, sid, command))) => {
                    if left > 0 {
                        st.actions.insert(aid, (left - 1, sid, command));
                        return (200, serde_json::json!({"action": action(aid, command, "running")}));
                    }
                    match command {
                        "delete_server" => {
                            st.servers.remove(&sid);
                        }
                        _ => {
                            if let Some(s) = st.servers.get_mut(&sid) {
                                s["status"] = serde_json::json!("running");
                            }
                        }
                    }
                    (200, serde_json::json!({"action": action(aid, command, "success")}))
                }
                None => (404, error("not_found", "action not found")),
            }
        }
        _ => (404, error("not_found", &format!("no route {method} {path}"))),
    }
}
