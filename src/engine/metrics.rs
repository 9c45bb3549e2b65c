//! The controller's metrics (`/metrics`, Prometheus text format from the official `prometheus-client` crate;
//! one registry, passed in, never a global) and its health (`/healthz`), served by hyper on `--listen`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::reconcile::Iteration;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Every series the controller exposes.
pub struct Metrics {
    registry: Registry,
    iterations: Family<Labels, Counter>,
    iteration_seconds: Histogram,
    errors: Counter,
    queued_jobs: Family<Labels, Gauge>,
    oldest_queued_seconds: Family<Labels, Gauge>,
    runners: Family<Labels, Gauge>,
    machines: Family<Labels, Gauge>,
    hosts: Family<Labels, Gauge>,
    oldest_host_seconds: Family<Labels, Gauge>,
    pending_review: Gauge,
    unserved_jobs: Gauge,
    actions: Family<Labels, Counter>,
    lock_busy: Counter,
    last_success: Gauge,
    webhooks: Family<Labels, Counter>,
    forge_requests: Family<Labels, Counter>,
    forge_budget: Gauge,
    time_to_ready: Histogram,
    api_requests: Family<Labels, Counter>,
    queue_wait: Histogram,
    budget_headroom: Family<Labels, Gauge>,
    hosts_cost_per_day: Gauge<f64, std::sync::atomic::AtomicU64>,
    hosts_cost_so_far: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Jobs the last iteration saw queued: id → queued at.
    queued_before: Mutex<std::collections::HashMap<u64, chrono::DateTime<chrono::Utc>>>,
    health: Mutex<Health>,
    /// `POST /webhook`: the secret deliveries are signed with, and what a valid `workflow_job` wakes.
    webhook: Mutex<Option<Webhook>>,
}

/// How webhook deliveries are checked and what they wake.
pub struct Webhook {
    pub secret: crate::forges::Secret,
    pub wake: Arc<tokio::sync::Notify>,
}

/// The largest webhook body accepted (GitHub caps deliveries at 25 MB; `workflow_job` events are a few KB).
pub const WEBHOOK_MAX_BODY: usize = 1 << 20;

/// What `/healthz` answers from.
struct Health {
    last_success: Option<Instant>,
    interval: Duration,
}

impl Metrics {
    pub fn new(interval: Duration) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("nimbus");
        let m = Metrics {
            iterations: Family::default(),
            iteration_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            errors: Counter::default(),
            queued_jobs: Family::default(),
            oldest_queued_seconds: Family::default(),
            runners: Family::default(),
            machines: Family::default(),
            hosts: Family::default(),
            oldest_host_seconds: Family::default(),
            pending_review: Gauge::default(),
            unserved_jobs: Gauge::default(),
            actions: Family::default(),
            lock_busy: Counter::default(),
            last_success: Gauge::default(),
            webhooks: Family::default(),
            forge_requests: Family::default(),
            forge_budget: Gauge::default(),
            time_to_ready: Histogram::new(exponential_buckets(5.0, 2.0, 12)),
            api_requests: Family::default(),
            queue_wait: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            queued_before: Mutex::new(Default::default()),
            budget_headroom: Family::default(),
            hosts_cost_per_day: Gauge::default(),
            hosts_cost_so_far: Gauge::default(),
            health: Mutex::new(Health { last_success: None, interval }),
            webhook: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("reconcile_iterations", "Reconcile iterations, by outcome", m.iterations.clone());
        registry.register("reconcile_iteration_seconds", "How long an iteration took", m.iteration_seconds.clone());
        registry.register("reconcile_errors", "Iterations that failed as a whole", m.errors.clone());
        registry.register(
            "reconcile_lock_busy",
            "Iterations skipped: someone else held the fleet's lock",
            m.lock_busy.clone(),
        );
        registry.register("queued_jobs", "Jobs queued on the forge that the pool can serve", m.queued_jobs.clone());
        registry.register(
            "oldest_queued_job_age_seconds",
            "Age of the oldest queued job the pool can serve",
            m.oldest_queued_seconds.clone(),
        );
        registry.register("runners", "Runners by pool and state (busy, idle, offline)", m.runners.clone());
        registry.register("machines", "Machines by pool and lifecycle state", m.machines.clone());
        registry.register("hosts", "Dedicated hosts by state", m.hosts.clone());
        registry.register(
            "oldest_host_age_seconds",
            "Age of the oldest dedicated host, by state",
            m.oldest_host_seconds.clone(),
        );
        registry.register("pending_review", "Changes the policy leaves for a person", m.pending_review.clone());
        registry.register(
            "unserved_jobs",
            "Jobs queued longer than the alert time that no pool can take",
            m.unserved_jobs.clone(),
        );
        registry.register("actions", "Actions carried out, by kind and outcome", m.actions.clone());
        registry.register(
            "reconcile_last_success_timestamp_seconds",
            "When the last iteration succeeded (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries, by result (accepted, ignored, refused, too_large)",
            m.webhooks.clone(),
        );
        registry.register(
            "forge_demand_requests",
            "Requests the forge was asked for queued jobs, by answer (ok, not_modified: a 304 from the ETag)",
            m.forge_requests.clone(),
        );
        registry.register(
            "time_to_ready_seconds",
            "From a machine's launch to its runner registered (or, without one, set up)",
            m.time_to_ready.clone(),
        );
        registry.register(
            "forge_rate_limit_remaining",
            "The forge's API budget left, as its last answer said (x-ratelimit-remaining)",
            m.forge_budget.clone(),
        );
        registry.register(
            "budget_hosts_headroom",
            "budget.max_hosts minus the dedicated hosts held, by instance type",
            m.budget_headroom.clone(),
        );
        registry.register(
            "hosts_cost_dollars_per_day",
            "What the dedicated hosts held cost per day (the ledger's prices)",
            m.hosts_cost_per_day.clone(),
        );
        registry.register(
            "hosts_billed_dollars",
            "What the dedicated hosts held have been billed so far (the ledger's)",
            m.hosts_cost_so_far.clone(),
        );
        registry.register(
            "api_requests",
            "Requests to providers' and forges' APIs, by kind (provider, forge), name and outcome (ok, error, throttled)",
            m.api_requests.clone(),
        );
        registry.register(
            "job_queue_wait_seconds",
            "From a job queued to it leaving the queue (started), as the forge reports it; measured at the first iteration that no longer sees it queued",
            m.queue_wait.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Records a finished iteration.
    pub fn iteration(&self, it: &Iteration, took: Duration) {
        self.iteration_seconds.observe(took.as_secs_f64());
        let outcome = if it.locked_by.is_some() {
            self.lock_busy.inc();
            "skipped"
        } else if it.errors.is_empty() {
            "success"
        } else {
            "action_errors"
        };
        self.iterations.get_or_create(&labels(&[("outcome", outcome)])).inc();
        if it.locked_by.is_some() {
            return;
        }
        for family in [&self.queued_jobs, &self.oldest_queued_seconds, &self.runners, &self.machines, &self.hosts] {
            family.clear();
        }
        self.oldest_host_seconds.clear();
        for p in &it.observed.pools {
            let pool = p.pool.as_str();
            self.queued_jobs.get_or_create(&labels(&[("pool", pool)])).set(p.queued as i64);
            self.oldest_queued_seconds.get_or_create(&labels(&[("pool", pool)])).set(p.oldest_queued_secs);
            for (state, n) in [("busy", p.busy), ("idle", p.idle), ("offline", p.offline)] {
                self.runners.get_or_create(&labels(&[("pool", pool), ("state", state)])).set(n as i64);
            }
            for (state, n) in &p.lifecycle {
                self.machines.get_or_create(&labels(&[("pool", pool), ("state", state)])).set(*n as i64);
            }
        }
        for h in &it.observed.hosts {
            self.hosts.get_or_create(&labels(&[("state", &h.state)])).set(h.count as i64);
            self.oldest_host_seconds.get_or_create(&labels(&[("state", &h.state)])).set(h.oldest_secs);
        }
        self.budget_headroom.clear();
        for (t, n) in &it.observed.budget_headroom {
            self.budget_headroom.get_or_create(&labels(&[("instance_type", t)])).set(*n);
        }
        self.hosts_cost_per_day.set(it.observed.cost_per_day);
        self.hosts_cost_so_far.set(it.observed.cost_so_far);
        self.pending_review.set(it.pending_review.len() as i64);
        self.unserved_jobs.set(it.demand.unserved.len() as i64);
        let (asked, not_modified) = it.forge_requests;
        self.forge_requests.get_or_create(&labels(&[("answer", "ok")])).inc_by(asked - not_modified);
        self.forge_requests.get_or_create(&labels(&[("answer", "not_modified")])).inc_by(not_modified);
        if let Some(b) = it.forge_budget {
            self.forge_budget.set(b);
        }
        for d in &it.ready {
            self.time_to_ready.observe(d.as_secs_f64());
        }
        {
            // A job the last iteration saw queued and this one does not has started (GitHub reports no start time
            // for a job nimbus no longer lists): its wait is measured to now, within one interval.
            let now = chrono::Utc::now();
            let mut before = self.queued_before.lock().expect("lock");
            for (id, at) in before.iter() {
                if !it.queued.iter().any(|j| j.id == *id) {
                    self.queue_wait.observe((now - *at).num_milliseconds().max(0) as f64 / 1000.0);
                }
            }
            *before = it.queued.iter().map(|j| (j.id, j.queued_at)).collect();
        }
        for (kind, outcome, n) in &it.actions {
            self.actions.get_or_create(&labels(&[("kind", kind), ("outcome", outcome)])).inc_by(*n as u64);
        }
        let mut h = self.health.lock().expect("lock");
        h.last_success = Some(Instant::now());
        self.last_success.set(chrono::Utc::now().timestamp());
    }

    /// Records an iteration that failed as a whole.
    pub fn error(&self, took: Duration) {
        self.iteration_seconds.observe(took.as_secs_f64());
        self.errors.inc();
        self.iterations.get_or_create(&labels(&[("outcome", "error")])).inc();
    }

    /// Accepts signed webhook deliveries from now on (`None`: `/webhook` is off).
    pub fn set_webhook(&self, w: Option<Webhook>) {
        *self.webhook.lock().expect("lock") = w;
    }

    /// Checks one delivery: 401 for a missing or bad signature, 202 for a `workflow_job` (the loop wakes), 200
    /// for anything else (ignored).
    fn deliver(&self, signature: Option<&str>, event: Option<&str>, body: &[u8]) -> (u16, &'static str) {
        let guard = self.webhook.lock().expect("lock");
        let Some(w) = guard.as_ref() else { return (404, "no webhook is configured (reconcile.webhook_secret)\n") };
        let expected = crate::util::secrets::hmac_sha256(w.secret.expose().trim_end().as_bytes(), body);
        let given = signature.and_then(|s| s.strip_prefix("sha256=")).and_then(|h| {
            (h.len() == 64)
                .then(|| {
                    (0..32).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()).collect::<Option<Vec<u8>>>()
                })
                .flatten()
        });
        if !given.is_some_and(|g| crate::util::secrets::constant_time_eq(&g, &expected)) {
            self.webhooks.get_or_create(&labels(&[("result", "refused")])).inc();
            tracing::warn!(
                event = "nimbus.webhook.refused",
                "a webhook delivery with a missing or bad signature was refused"
            );
            return (401, "bad or missing X-Hub-Signature-256\n");
        }
        if event == Some("workflow_job") {
            self.webhooks.get_or_create(&labels(&[("result", "accepted")])).inc();
            w.wake.notify_one();
            (202, "the next iteration starts now\n")
        } else {
            self.webhooks.get_or_create(&labels(&[("result", "ignored")])).inc();
            (200, "ignored: only workflow_job events start an iteration\n")
        }
    }

    fn too_large(&self) -> hyper::Response<Full<Bytes>> {
        self.webhooks.get_or_create(&labels(&[("result", "too_large")])).inc();
        text(413, "a webhook body is at most 1 MiB\n")
    }

    /// The interval changed (a reload).
    pub fn set_interval(&self, interval: Duration) {
        self.health.lock().expect("lock").interval = interval;
    }

    /// Healthy while the last iteration succeeded within 3 intervals.
    pub fn healthy(&self) -> bool {
        let h = self.health.lock().expect("lock");
        h.last_success.is_some_and(|t| t.elapsed() <= h.interval * 3)
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> String {
        {
            // The API request counters follow the process's counts (one writer at a time).
            let _one = self.health.lock().expect("lock");
            for ((kind, name, outcome), n) in crate::util::telemetry::api_requests() {
                let c = self.api_requests.get_or_create(&labels(&[
                    ("kind", &kind),
                    ("name", &name),
                    ("outcome", outcome.as_str()),
                ]));
                if n > c.get() {
                    c.inc_by(n - c.get());
                }
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        if req.uri().path() != "/webhook" {
            return self.respond(req.uri().path());
        }
        if req.method() != hyper::Method::POST {
            return text(405, "POST a webhook delivery here\n");
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (signature, event) = (header("x-hub-signature-256"), header("x-github-event"));
        if header("content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > WEBHOOK_MAX_BODY) {
            return self.too_large();
        }
        let body = match http_body_util::Limited::new(req.into_body(), WEBHOOK_MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.too_large(),
        };
        let (status, message) = self.deliver(signature.as_deref(), event.as_deref(), &body);
        text(status, message)
    }

    fn respond(&self, path: &str) -> hyper::Response<Full<Bytes>> {
        let (status, ctype, body) = match path {
            "/metrics" => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", self.encode()),
            "/healthz" if self.healthy() => (200, "text/plain; charset=utf-8", "ok\n".to_string()),
            "/healthz" => (
                503,
                "text/plain; charset=utf-8",
                "the last successful iteration is older than 3 intervals\n".to_string(),
            ),
            _ => (404, "text/plain; charset=utf-8", "not found: /metrics and /healthz are served here\n".to_string()),
        };
        hyper::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(m.handle(req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Binds `addr` (the port may be 0: the system picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn text(status: u16, body: &str) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}
