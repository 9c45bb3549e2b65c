//! Hetzner Cloud: servers, found by their labels.
//!
//! A thin client on the HTTP stack already in the tree (hyper-util's client with hyper-rustls): a handful of
//! routes — `GET/POST /servers`, `GET/DELETE /servers/{id}`, `POST /servers/{id}/actions/rebuild`,
//! `GET /actions/{id}` — checked against the API's OpenAPI description by the contract tests.
//!
//! - **Labels** stand in for tags: `nimbus/tenant`, `nimbus/provider`, `nimbus/pool`, `nimbus/machine`,
//!   `nimbus/fleet`, `nimbus/managed-by`. Values are encoded to what labels allow (`[A-Za-z0-9._-]`, at most
//!   63 characters; see [`label_value`]). Discovery asks for `label_selector=nimbus/tenant=T`, then filters
//!   again here: a server that ignores the selector still shows nimbus nothing of another tenant, provider or
//!   fleet, and nimbus never deletes one.
//! - **Actions** (create, delete, rebuild) are polled until they finish.
//! - **Rate limit**: 3,600 requests an hour per project. A client-side limiter spaces requests once the budget
//!   the server reports (`RateLimit-Remaining`) runs low; a 429 waits for `RateLimit-Reset` (bounded) and is
//!   retried, then classified as `Throttled`.

pub mod config;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::json;

use super::aws::TransportFactory;
use super::{Discovered, LaunchRequest, MachineRef, Provider, ProviderError};
use crate::core::model::{
    ActualMachine, FleetScope, InstanceState, OnMachine, OtherFleetResource, Tags, machine_tags, owned_by,
};
use crate::core::names::tags;
use crate::transport::Transport;

/// Settings a test (or `from_config`) gives the provider.
#[derive(Debug, Clone)]
pub struct HetznerSettings {
    pub api_url: String,
    pub token: String,
    pub location: Option<String>,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    /// Results per page (the API allows up to 50).
    pub page_size: u32,
    /// Tries per request (429s and 5xx).
    pub attempts: u32,
    /// How often an action is polled.
    pub poll: Duration,
    pub requests_per_hour: u32,
}

impl HetznerSettings {
    pub fn new(api_url: impl Into<String>, token: impl Into<String>) -> Self {
        HetznerSettings {
            api_url: api_url.into(),
            token: token.into(),
            location: None,
            ssh_keys: Vec::new(),
            user_data: None,
            page_size: 50,
            attempts: 5,
            poll: Duration::from_secs(1),
            requests_per_hour: config::DEFAULT_REQUESTS_PER_HOUR,
        }
    }
}

pub struct HetznerProvider {
    name: String,
    tenant: String,
    settings: HetznerSettings,
    client: crate::util::http::HyperClient,
    fleet: Option<FleetScope>,
    transport: Option<TransportFactory>,
    /// Requests sent, by route (`GET /servers`, …), for tests and benchmarks.
    requests: std::sync::Mutex<BTreeMap<String, u64>>,
    /// The budget left as the server last said (`RateLimit-Remaining`; u64::MAX: not said yet).
    remaining: AtomicU64,
    /// Serialises the limiter's spacing.
    pace: tokio::sync::Mutex<std::time::Instant>,
}

/// A label key for a nimbus tag: `nimbus:tenant` → `nimbus/tenant`.
pub fn label_key(tag: &str) -> String {
    tag.replacen(':', "/", 1)
}

/// A label value for a tag value: labels allow `[A-Za-z0-9._-]`, at most 63 characters, starting and ending
/// alphanumeric. `_` escapes: `__` is `_`, `_2f` is `/` (any other byte as two hex digits); a value still longer
/// than 63 is cut to 54 characters and given `-` and 8 hex digits of its sha256.
pub fn label_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => out.push(b as char),
            b'_' => out.push_str("__"),
            other => out.push_str(&format!("_{other:02x}")),
        }
    }
    if out.len() > 63 {
        let sum = crate::core::model::sha256_hex(v.as_bytes());
        out.truncate(54);
        out.push('-');
        out.push_str(&sum[..8]);
    }
    out
}

/// Reverses [`label_value`] (a cut value stays as it is).
pub fn from_label_value(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            if b.get(i + 1) == Some(&b'_') {
                out.push(b'_');
                i += 2;
                continue;
            }
            if let Some(h) = v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(h);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn labels_of(t: &Tags) -> serde_json::Map<String, serde_json::Value> {
    t.iter().map(|(k, v)| (label_key(k), serde_json::Value::String(label_value(v)))).collect()
}

#[derive(Debug, Deserialize)]
struct Server {
    id: u64,
    status: String,
    #[serde(default)]
    created: Option<DateTime<Utc>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    server_type: Option<Named>,
    #[serde(default)]
    image: Option<Named>,
    #[serde(default)]
    datacenter: Option<Datacenter>,
    #[serde(default)]
    public_net: Option<PublicNet>,
    #[serde(default)]
    private_net: Vec<PrivateNet>,
}

#[derive(Debug, Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Datacenter {
    #[serde(default)]
    location: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct PublicNet {
    #[serde(default)]
    ipv4: Option<Ip>,
}

#[derive(Debug, Deserialize)]
struct Ip {
    ip: String,
}

#[derive(Debug, Deserialize)]
struct PrivateNet {
    #[serde(default)]
    ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Action {
    id: u64,
    status: String,
    #[serde(default)]
    error: Option<ActionError>,
}

#[derive(Debug, Deserialize)]
struct ActionError {
    code: String,
    message: String,
}

fn state_of(status: &str) -> InstanceState {
    match status {
        "running" => InstanceState::Running,
        "initializing" | "starting" | "migrating" | "rebuilding" => InstanceState::Pending,
        "stopping" => InstanceState::Stopping,
        "off" => InstanceState::Stopped,
        "deleting" => InstanceState::ShuttingDown,
        _ => InstanceState::Pending,
    }
}

impl HetznerProvider {
    pub fn new(name: &str, tenant: &str, settings: HetznerSettings) -> Result<Self, ProviderError> {
        let client = crate::util::http::client().map_err(|e| ProviderError::other(name, e))?;
        Ok(HetznerProvider {
            name: name.into(),
            tenant: tenant.into(),
            settings,
            client,
            fleet: None,
            transport: None,
            requests: Default::default(),
            remaining: AtomicU64::new(u64::MAX),
            pace: tokio::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    pub fn from_config(
        name: &str,
        c: &config::HetznerConfig,
        ctx: &super::BuildContext,
    ) -> Result<Self, ProviderError> {
        let token = crate::util::secrets::read(&format!("providers.{name}.token"), &c.token, &ctx.base_dir)
            .map_err(|e| ProviderError::Auth { provider: name.into(), message: e.to_string() })?;
        let mut s = HetznerSettings::new(c.api_url.clone().unwrap_or_else(|| config::DEFAULT_API_URL.into()), token);
        s.location = c.location.clone();
        s.ssh_keys = c.ssh_keys.clone();
        s.user_data = c.user_data.clone();
        s.requests_per_hour = c.requests_per_hour.unwrap_or(config::DEFAULT_REQUESTS_PER_HOUR);
        let mut p = HetznerProvider::new(name, &ctx.tenant, s)?.with_fleet(ctx.fleet.clone());
        if let Some(ssh) = &ctx.ssh {
            p = p.with_transport(super::aws::reach::over_ssh(ssh.clone()));
        }
        Ok(p)
    }

    pub fn with_fleet(mut self, fleet: FleetScope) -> Self {
        self.fleet = Some(fleet);
        self
    }

    pub fn with_transport(mut self, f: TransportFactory) -> Self {
        self.transport = Some(f);
        self
    }

    /// Requests sent so far, by route.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.requests.lock().expect("lock").clone()
    }

    fn route_of(method: &str, path: &str) -> String {
        let p = path.split('?').next().unwrap_or(path);
        let shape: Vec<&str> = p
            .split('/')
            .map(|s| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { "{id}" } else { s })
            .collect();
        format!("{method} {}", shape.join("/"))
    }

    /// Spaces requests once the server's budget runs low: with `remaining` requests left, at most one every
    /// `3600 s / requests_per_hour` (one a second at the default); with plenty left, no wait.
    async fn limit(&self) {
        let remaining = self.remaining.load(Ordering::Relaxed);
        if remaining > 100 {
            return;
        }
        let gap = Duration::from_secs_f64(3600.0 / self.settings.requests_per_hour.max(1) as f64);
        let mut last = self.pace.lock().await;
        let next = *last + gap;
        let now = std::time::Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        *last = std::time::Instant::now();
    }

    /// One request with retries on 429 (waiting for `Retry-After`/`RateLimit-Reset`, bounded) and 5xx, each
    /// attempt reported as an API call.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ProviderError> {
        let route = Self::route_of(method, path);
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=self.settings.attempts.max(1) {
            self.limit().await;
            *self.requests.lock().expect("lock").entry(route.clone()).or_default() += 1;
            let machine = crate::util::telemetry::api_machine();
            crate::util::telemetry::api_request_start(&self.tenant, &self.name, &route, &machine);
            let started = std::time::Instant::now();
            let uri = format!("{}{path}", self.settings.api_url.trim_end_matches('/'));
            let req = hyper::Request::builder()
                .method(method)
                .uri(&uri)
                .header("authorization", format!("Bearer {}", self.settings.token))
                .header("content-type", "application/json")
                .header("user-agent", concat!("nimbus/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(Bytes::from(body.as_ref().map(|b| b.to_string()).unwrap_or_default())))
                .map_err(|e| ProviderError::other(&self.name, format!("{route}: {e}")))?;
            let resp = match self.client.request(req).await {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("{route}: {e}");
                    crate::util::telemetry::api_request_end(
                        &self.tenant,
                        &self.name,
                        &route,
                        &machine,
                        started.elapsed(),
                        Some(&msg),
                        crate::util::telemetry::ApiOutcome::Error,
                    );
                    if attempt == self.settings.attempts.max(1) {
                        return Err(ProviderError::other(&self.name, msg));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            if let Some(r) = header("ratelimit-remaining").and_then(|v| v.parse().ok()) {
                self.remaining.store(r, Ordering::Relaxed);
            }
            let wait = match (header("retry-after"), header("ratelimit-reset")) {
                (Some(s), _) => s.parse::<u64>().ok().map(Duration::from_secs),
                (None, Some(reset)) => reset
                    .parse::<i64>()
                    .ok()
                    .map(|r| Duration::from_secs((r - Utc::now().timestamp()).clamp(0, 60) as u64)),
                _ => None,
            };
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let error = (status >= 400).then(|| {
                let e = &value["error"];
                format!(
                    "{route}: HTTP {status}: {} ({})",
                    e["message"].as_str().unwrap_or("no message"),
                    e["code"].as_str().unwrap_or("no code")
                )
            });
            let outcome = if status == 429 {
                crate::util::telemetry::ApiOutcome::Throttled
            } else {
                crate::util::telemetry::ApiOutcome::Error
            };
            crate::util::telemetry::api_request_end(
                &self.tenant,
                &self.name,
                &route,
                &machine,
                started.elapsed(),
                error.as_deref(),
                outcome,
            );
            let retryable = status == 429 || status >= 500;
            if retryable && attempt < self.settings.attempts.max(1) {
                let w = wait.unwrap_or(backoff).min(Duration::from_secs(60)).max(Duration::from_millis(50));
                tokio::time::sleep(w).await;
                backoff *= 2;
                continue;
            }
            return match status {
                429 => {
                    Err(ProviderError::Throttled { provider: self.name.clone(), message: error.unwrap_or_default() })
                }
                401 | 403 => {
                    Err(ProviderError::Auth { provider: self.name.clone(), message: error.unwrap_or_default() })
                }
                404 => Err(ProviderError::NotFound { provider: self.name.clone(), message: error.unwrap_or_default() }),
                s if s >= 400 => Err(ProviderError::other(&self.name, error.unwrap_or_default())),
                _ => Ok((status, value)),
            };
        }
        unreachable!("the loop returns")
    }

    /// Waits until the action finishes: its error, if it failed.
    async fn wait_action(&self, action: &serde_json::Value) -> Result<(), ProviderError> {
        let Ok(mut a) = serde_json::from_value::<Action>(action.clone()) else { return Ok(()) };
        let deadline = std::time::Instant::now() + Duration::from_secs(1800);
        loop {
            match a.status.as_str() {
                "success" => return Ok(()),
                "error" => {
                    let e = a.error.map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default();
                    return Err(ProviderError::other(&self.name, format!("action {} failed: {e}", a.id)));
                }
                _ => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(ProviderError::other(&self.name, format!("action {} did not finish in 30 minutes", a.id)));
            }
            tokio::time::sleep(self.settings.poll).await;
            let (_, v) = self.call("GET", &format!("/actions/{}", a.id), None).await?;
            a = serde_json::from_value(v["action"].clone())
                .map_err(|e| ProviderError::other(&self.name, format!("GET /actions/{}: {e}", a.id)))?;
        }
    }

    /// This tenant's servers (every page), as the server's label selector and nimbus's own check agree.
    async fn servers(&self) -> Result<Vec<Server>, ProviderError> {
        let selector = format!("{}={}", label_key(tags::TENANT), label_value(&self.tenant));
        let mut out = Vec::new();
        for page in 1.. {
            let path = self.list_path(&selector, page);
            let (_, v) = self.call("GET", &path, None).await?;
            let list: Vec<Server> = serde_json::from_value(v["servers"].clone())
                .map_err(|e| ProviderError::other(&self.name, format!("GET /servers: unexpected answer: {e}")))?;
            let n = list.len();
            out.extend(list);
            // The last page has no next page; a server that names the same page again is not followed.
            let next = v["meta"]["pagination"]["next_page"].as_u64();
            if n == 0 || next.is_none_or(|next| next <= page) {
                break;
            }
        }
        Ok(out)
    }

    fn tags_of(&self, s: &Server) -> Tags {
        let mut t: Tags = s
            .labels
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("nimbus/").map(|rest| (format!("nimbus:{rest}"), from_label_value(v))))
            .collect();
        // A fleet id too long for a label was cut: it is this fleet's when it is this fleet's id, cut the same way.
        if let (Some(f), Some(fleet)) = (t.get(tags::FLEET).map(str::to_string), &self.fleet)
            && let Some(own) = Some(fleet.id.as_str())
            && f != own
            && label_value(own) == label_value(&f)
        {
            t.insert(tags::FLEET, own);
        }
        t
    }

    fn is_mine(&self, t: &Tags) -> Result<bool, Option<OtherFleetResource>> {
        if !owned_by(t, &self.tenant) || t.get(tags::PROVIDER) != Some(&self.name) {
            return Err(None);
        }
        match &self.fleet {
            Some(f) if !f.claims(t) => Err(Some(OtherFleetResource {
                provider: self.name.clone(),
                id: String::new(),
                machine: t.get(tags::MACHINE).map(str::to_string),
                fleet: t.get(tags::FLEET).map(str::to_string).unwrap_or_default(),
            })),
            _ => Ok(true),
        }
    }

    fn machine_of(&self, s: &Server, t: Tags) -> ActualMachine {
        ActualMachine {
            provider: self.name.as_str().into(),
            instance_id: s.id.to_string(),
            tags: t,
            state: state_of(&s.status),
            image: s.image.as_ref().and_then(|i| i.name.clone()).unwrap_or_default().into(),
            instance_type: s.server_type.as_ref().and_then(|t| t.name.clone()).map(crate::core::model::Sym::from),
            availability_zone: s
                .datacenter
                .as_ref()
                .and_then(|d| d.location.as_ref())
                .and_then(|l| l.name.clone())
                .map(crate::core::model::Sym::from),
            host_id: None,
            launched_at: s.created.unwrap_or_else(Utc::now),
            address: s
                .private_net
                .iter()
                .find_map(|n| n.ip.clone())
                .or_else(|| s.public_net.as_ref().and_then(|p| p.ipv4.as_ref()).map(|i| i.ip.clone())),
            on_machine: OnMachine::NotRead,
            unreachable_since: None,
        }
    }

    /// One server by id, whoever owns it (`None`: gone).
    async fn server(&self, id: &str) -> Result<Option<Server>, ProviderError> {
        match self.call("GET", &format!("/servers/{id}"), None).await {
            Ok((_, v)) => Ok(serde_json::from_value(v["server"].clone()).ok()),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The server of `machine`, if this tenant's and this provider's: a server of anyone else is refused.
    async fn own_server(&self, m: &MachineRef) -> Result<Option<Server>, ProviderError> {
        let Some(id) = &m.instance_id else { return Ok(None) };
        if !id.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(None);
        }
        let Some(s) = self.server(id).await? else { return Ok(None) };
        let t = self.tags_of(&s);
        match self.is_mine(&t) {
            Ok(_) if t.get(tags::MACHINE) == Some(&m.name) => Ok(Some(s)),
            _ => Err(ProviderError::conflict(
                &self.name,
                format!(
                    "server {id} is not `{}` of tenant `{}` on this provider: nimbus leaves it alone",
                    m.name, self.tenant
                ),
            )),
        }
    }
}

#[async_trait]
impl Provider for HetznerProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn discover(&self, tenant: &str) -> Result<Discovered, ProviderError> {
        if tenant != self.tenant {
            return Err(ProviderError::other(&self.name, format!("provider was built for tenant `{}`", self.tenant)));
        }
        let mut out = Discovered::default();
        for s in self.servers().await? {
            let t = self.tags_of(&s);
            match self.is_mine(&t) {
                Ok(_) => out.machines.push(self.machine_of(&s, t)),
                Err(Some(mut other)) => {
                    other.id = s.id.to_string();
                    out.other_fleets.push(other);
                }
                Err(None) => {}
            }
        }
        Ok(out)
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<String, ProviderError> {
        if req.tenant != self.tenant {
            return Err(ProviderError::other(&self.name, format!("provider was built for tenant `{}`", self.tenant)));
        }
        // Idempotent: a server already labelled for this machine (an interrupted run's) is the one.
        for s in self.servers().await? {
            let t = self.tags_of(&s);
            if self.is_mine(&t).is_ok() && t.get(tags::MACHINE) == Some(&req.machine) && s.status != "deleting" {
                return Ok(s.id.to_string());
            }
        }
        let body = self.create_body(req);
        let (_, v) = self.call("POST", "/servers", Some(body)).await?;
        let id = v["server"]["id"]
            .as_u64()
            .ok_or_else(|| ProviderError::other(&self.name, "POST /servers: no server id in the answer"))?;
        self.wait_action(&v["action"]).await?;
        Ok(id.to_string())
    }

    async fn terminate(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        self.terminate_server(machine).await
    }

    async fn reimage(&self, machine: &MachineRef, image: &str) -> Result<(), ProviderError> {
        self.rebuild(machine, image).await
    }

    async fn wait_running(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        self.wait_for_running(machine).await
    }

    fn transport(&self, machine: &MachineRef) -> Result<Option<Arc<dyn Transport>>, ProviderError> {
        Ok(self.transport.as_ref().and_then(|f| f(machine)))
    }

    fn reports_requests(&self) -> bool {
        true
    }
}

impl HetznerProvider {
    /// `GET /servers` of one page, with the tenant's label selector.
    pub fn list_path(&self, selector: &str, page: u64) -> String {
        format!(
            "/servers?label_selector={}&page={page}&per_page={}",
            crate::util::http::encode(selector),
            self.settings.page_size.clamp(1, 50)
        )
    }

    /// The body of `POST /servers` for a launch.
    pub fn create_body(&self, req: &LaunchRequest) -> serde_json::Value {
        let fleet = self.fleet.as_ref().map(|f| f.id.clone());
        let t = machine_tags(&self.tenant, &self.name, &req.pool, &req.machine, fleet.as_deref());
        let location = req.spec.availability_zone.clone().or_else(|| self.settings.location.clone());
        let mut body = json!({
            // Server names are hostnames: the machine name with its dots as dashes.
            "name": req.machine.replace('.', "-"),
            "server_type": req.spec.instance_type.clone().unwrap_or_default(),
            "image": req.spec.image,
            "labels": labels_of(&t),
            "start_after_create": true,
        });
        if let Some(l) = location {
            body["location"] = json!(l);
        }
        if !self.settings.ssh_keys.is_empty() {
            body["ssh_keys"] = json!(self.settings.ssh_keys);
        }
        if let Some(u) = &self.settings.user_data {
            body["user_data"] = json!(u);
        }
        body
    }

    /// One request as the provider sends it (headers, retries, rate limit): for the contract tests.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ProviderError> {
        self.call(method, path, body).await
    }

    /// Whether an answer of `GET /servers` reads as the provider reads it (the servers' ids).
    pub fn parse_servers(v: &serde_json::Value) -> Result<Vec<u64>, String> {
        serde_json::from_value::<Vec<Server>>(v["servers"].clone())
            .map(|s| s.iter().map(|s| s.id).collect())
            .map_err(|e| e.to_string())
    }

    /// Whether an action reads as the provider reads it (its status).
    pub fn parse_action(v: &serde_json::Value) -> Result<String, String> {
        serde_json::from_value::<Action>(v.clone()).map(|a| a.status).map_err(|e| e.to_string())
    }

    async fn terminate_server(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        let Some(s) = self.own_server(machine).await? else { return Ok(()) };
        match self.call("DELETE", &format!("/servers/{}", s.id), None).await {
            Ok((_, v)) => self.wait_action(&v["action"]).await,
            Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn rebuild(&self, machine: &MachineRef, image: &str) -> Result<(), ProviderError> {
        let Some(s) = self.own_server(machine).await? else {
            return Err(ProviderError::NotFound {
                provider: self.name.clone(),
                message: format!("`{}` is gone", machine.name),
            });
        };
        let (_, v) =
            self.call("POST", &format!("/servers/{}/actions/rebuild", s.id), Some(json!({ "image": image }))).await?;
        self.wait_action(&v["action"]).await
    }

    async fn wait_for_running(&self, machine: &MachineRef) -> Result<(), ProviderError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(900);
        loop {
            match self.own_server(machine).await? {
                Some(s) if s.status == "running" => return Ok(()),
                Some(_) if std::time::Instant::now() < deadline => tokio::time::sleep(self.settings.poll).await,
                Some(s) => {
                    return Err(ProviderError::other(
                        &self.name,
                        format!("`{}` is still {} after 15 minutes", machine.name, s.status),
                    ));
                }
                None => {
                    return Err(ProviderError::NotFound {
                        provider: self.name.clone(),
                        message: format!("`{}` is gone", machine.name),
                    });
                }
            }
        }
    }
}
