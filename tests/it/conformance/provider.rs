//! The provider conformance suite. Each check is a function over a [`Peer`]; the local provider runs it on
//! sandboxes, the AWS provider on moto behind [`Ec2Proxy`] (which can ignore filters and throttle, as moto
//! itself cannot). A check that does not apply to a provider's capabilities asserts the provider refuses
//! what it cannot do, rather than passing silently.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nimbus::config::{Arch, Os};
use nimbus::core::model::MachineSpec;
use nimbus::providers::{HostRequest, LaunchRequest, MachineRef, Provider, ProviderError};

use super::ec2_proxy::Ec2Proxy;
use crate::common::*;

/// How a provider's test peer is driven.
#[async_trait]
pub trait Peer: Send + Sync {
    /// A provider for `tenant`, as a fresh run builds it (a new client: retries share nothing with the last run).
    async fn provider(&self, tenant: &str) -> Arc<dyn Provider>;
    /// Like [`Peer::provider`], with `page_size` results per page and `attempts` per call, when the provider
    /// pages and retries.
    async fn tuned(&self, tenant: &str, page_size: i32, attempts: u32) -> Arc<dyn Provider>;
    /// Another tenant's, an untagged and a half-tagged (tenant tag only) machine; their ids.
    async fn plant_foreign(&self, tenant: &str) -> Vec<String>;
    /// Whether the resource still exists and runs.
    async fn alive(&self, id: &str) -> bool;
    /// Makes the server ignore every filter; false when the provider has no server-side filters.
    fn ignore_filters(&self, on: bool) -> bool;
    /// Answers the next `n` requests with the provider's throttling error; false when it has none.
    fn throttle(&self, n: u32) -> bool;
    /// Requests the peer saw (all actions), for retry and page counts.
    fn requests(&self, action: &str) -> usize;
    fn has_hosts(&self) -> bool;
    fn pages(&self) -> bool;
    /// An id the provider never made.
    fn missing_id(&self) -> String;
}

fn launch(tenant: &str, pool: &str, i: u32, host: Option<String>, mac: bool) -> LaunchRequest {
    LaunchRequest {
        tenant: tenant.into(),
        pool: pool.into(),
        machine: nimbus::core::model::machine_name(tenant, pool, i),
        spec: MachineSpec {
            os: if mac { Os::Macos } else { Os::Linux },
            arch: Arch::Arm64,
            instance_type: Some(if mac { "mac2.metal" } else { "t3.large" }.into()),
            image: "ami-0conform".into(),
            availability_zone: Some("us-east-1a".into()),
            fallback_zones: vec![],
            tags: Default::default(),
        },
        host_id: host,
        idempotency_key: None,
    }
}

fn machine_ref(name: &str, id: &str) -> MachineRef {
    MachineRef { name: name.into(), instance_id: Some(id.into()), address: None }
}

/// Creating again after an interruption (a new run, a new client) finds what the first made, by its tags.
pub async fn idempotent_create_after_interruption(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-idem");
    let req = launch(&tenant, "p", 0, None, false);
    let first = peer.provider(&tenant).await.launch(&req).await.unwrap();
    let again = peer.provider(&tenant).await.launch(&req).await.unwrap();
    assert_eq!(first, again, "a rerun launched a second machine");
    let found = peer.provider(&tenant).await.discover(&tenant).await.unwrap();
    assert_eq!(found.machines.len(), 1, "{:?}", found.machines);
    if peer.has_hosts() {
        let h = HostRequest {
            tenant: tenant.clone(),
            pool: "mac".into(),
            machine: nimbus::core::model::machine_name(&tenant, "mac", 0),
            instance_type: "mac2.metal".into(),
            availability_zone: "us-east-1a".into(),
            fallback_zones: vec![],
            exclude_hosts: vec![],
            idempotency_key: None,
            tags: Default::default(),
        };
        let first = peer.provider(&tenant).await.allocate_host(&h).await.unwrap();
        let again = peer.provider(&tenant).await.allocate_host(&h).await.unwrap();
        assert_eq!(first, again, "a rerun allocated a second host");
        // ... unless the plan excluded it: then a new one.
        let other = peer
            .provider(&tenant)
            .await
            .allocate_host(&HostRequest { exclude_hosts: vec![first.clone()], ..h })
            .await
            .unwrap();
        assert_ne!(first, other);
    }
}

/// Another tenant's, untagged and half-tagged resources are never listed or touched, even when the server
/// ignores the filters nimbus sends.
pub async fn foreign_resources_are_untouched(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-mine");
    let foreign = peer.plant_foreign(&tenant).await;
    assert_eq!(foreign.len(), 3);
    let server_filters = peer.ignore_filters(true);
    let p = peer.provider(&tenant).await;
    let found = p.discover(&tenant).await.unwrap();
    let listed = format!("{:?}{:?}{:?}", found.machines, found.hosts, found.unusable);
    for id in &foreign {
        assert!(!listed.contains(id.as_str()), "{id} was listed (server filters ignored: {server_filters})");
        let e = p.terminate(&machine_ref(id, id)).await;
        assert!(e.is_err(), "terminating {id} was not refused");
    }
    peer.ignore_filters(false);
    for id in &foreign {
        assert!(peer.alive(id).await, "{id} was touched");
    }
}

/// A host inside its minimum allocation window is never released; a provider without hosts refuses.
pub async fn release_refused_inside_window(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-window");
    let p = peer.provider(&tenant).await;
    if !peer.has_hosts() {
        let e = p.release_host("h-0123456789abcdef0").await.unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        return;
    }
    let h = p
        .allocate_host(&HostRequest {
            tenant: tenant.clone(),
            pool: "mac".into(),
            machine: nimbus::core::model::machine_name(&tenant, "mac", 0),
            instance_type: "mac2.metal".into(),
            availability_zone: "us-east-1a".into(),
            fallback_zones: vec![],
            exclude_hosts: vec![],
            idempotency_key: None,
            tags: Default::default(),
        })
        .await
        .unwrap();
    let e = p.release_host(&h).await.unwrap_err();
    assert!(matches!(e, ProviderError::Conflict { .. }), "{e:?}");
    assert!(e.to_string().contains("minimum allocation window"), "{e}");
    assert!(peer.alive(&h).await);
}

/// Discovery reads every page.
pub async fn pagination_across_three_pages(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-pages");
    let p = peer.provider(&tenant).await;
    for i in 0..12 {
        p.launch(&launch(&tenant, "p", i, None, false)).await.unwrap();
    }
    let before = peer.requests("DescribeInstances");
    let tuned = peer.tuned(&tenant, 5, 8).await;
    let found = tuned.discover(&tenant).await.unwrap();
    assert_eq!(found.machines.len(), 12, "machines on later pages were missed");
    if peer.pages() {
        let pages = peer.requests("DescribeInstances") - before;
        assert!(pages >= 3, "12 machines at 5 a page took {pages} request(s)");
    }
}

/// Throttling is retried, and classified as `Throttled` when it outlasts the retries.
pub async fn throttling_is_retried_and_classified(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-throttle");
    if !peer.throttle(2) {
        // No throttling to model (a local provider): discovery simply works.
        peer.provider(&tenant).await.discover(&tenant).await.unwrap();
        return;
    }
    let before = peer.requests("DescribeHosts") + peer.requests("DescribeInstances");
    peer.provider(&tenant).await.discover(&tenant).await.expect("two throttled answers are retried");
    let seen = peer.requests("DescribeHosts") + peer.requests("DescribeInstances") - before;
    // Two throttled answers, then at least one that succeeds.
    assert!(seen >= 3, "throttled requests were not retried ({seen} requests)");
    assert!(peer.throttle(50));
    let e = peer.tuned(&tenant, 100, 2).await.discover(&tenant).await.unwrap_err();
    peer.throttle(0);
    assert!(matches!(e, ProviderError::Throttled { .. }), "{e:?}");
}

/// Deleting what is already gone (or never was) succeeds, so a rerun of a teardown is safe.
pub async fn delete_of_missing_is_success(peer: &dyn Peer) {
    let tenant = unique_tenant("conf-gone");
    let p = peer.provider(&tenant).await;
    let name = nimbus::core::model::machine_name(&tenant, "p", 0);
    p.terminate(&machine_ref(&name, &peer.missing_id())).await.expect("terminating a missing machine");
    let id = p.launch(&launch(&tenant, "p", 0, None, false)).await.unwrap();
    p.terminate(&machine_ref(&name, &id)).await.unwrap();
    p.terminate(&machine_ref(&name, &id)).await.expect("terminating twice");
}

pub async fn run_all(peer: &dyn Peer) {
    idempotent_create_after_interruption(peer).await;
    foreign_resources_are_untouched(peer).await;
    release_refused_inside_window(peer).await;
    pagination_across_three_pages(peer).await;
    throttling_is_retried_and_classified(peer).await;
    delete_of_missing_is_success(peer).await;
}

// ---------------------------------------------------------------- local

struct LocalPeer {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Peer for LocalPeer {
    async fn provider(&self, tenant: &str) -> Arc<dyn Provider> {
        Arc::new(nimbus::providers::local::LocalProvider::new("local", tenant, self.dir.path()))
    }
    async fn tuned(&self, tenant: &str, _: i32, _: u32) -> Arc<dyn Provider> {
        self.provider(tenant).await
    }
    async fn plant_foreign(&self, tenant: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for (name, tags) in [
            (
                "nimbus.other.p.9".to_string(),
                serde_json::json!({"nimbus:tenant": "other", "nimbus:provider": "local", "nimbus:managed-by": "nimbus", "nimbus:machine": "nimbus.other.p.9", "nimbus:pool": "p"}),
            ),
            (format!("nimbus.{tenant}.p.8"), serde_json::json!({})),
            (format!("nimbus.{tenant}.p.9"), serde_json::json!({"nimbus:tenant": tenant, "nimbus:pool": "p"})),
        ] {
            let d = self.dir.path().join(&name);
            std::fs::create_dir_all(d.join("root")).unwrap();
            let rec = serde_json::json!({"tags": tags, "image": "x", "state": "running", "launched_at": "2026-11-25T00:00:00Z"});
            std::fs::write(d.join("nimbus.json"), rec.to_string()).unwrap();
            ids.push(name);
        }
        ids
    }
    async fn alive(&self, id: &str) -> bool {
        self.dir.path().join(id).join("nimbus.json").exists()
    }
    fn ignore_filters(&self, _: bool) -> bool {
        false
    }
    fn throttle(&self, _: u32) -> bool {
        false
    }
    fn requests(&self, _: &str) -> usize {
        0
    }
    fn has_hosts(&self) -> bool {
        false
    }
    fn pages(&self) -> bool {
        false
    }
    fn missing_id(&self) -> String {
        "nimbus.nobody.p.0".into()
    }
}

#[test]
fn local_provider_conforms() {
    let peer = LocalPeer { dir: tempfile::tempdir().unwrap() };
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run_all(&peer));
}

// ---------------------------------------------------------------- aws (moto behind the proxy)

struct AwsPeer {
    proxy: Ec2Proxy,
}

#[async_trait]
impl Peer for AwsPeer {
    async fn provider(&self, tenant: &str) -> Arc<dyn Provider> {
        self.tuned(tenant, 1000, 8).await
    }
    async fn tuned(&self, tenant: &str, page_size: i32, attempts: u32) -> Arc<dyn Provider> {
        let s = nimbus::providers::aws::AwsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some(self.proxy.url.clone()),
            page_size: Some(page_size),
            max_attempts: Some(attempts),
            ..Default::default()
        };
        Arc::new(nimbus::providers::aws::AwsProvider::new("aws", tenant, s).await.unwrap())
    }
    async fn plant_foreign(&self, tenant: &str) -> Vec<String> {
        use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
        let c = sdk().await;
        let run = |tags: Vec<(String, String)>| {
            let c = c.clone();
            async move {
                let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
                let untagged = tags.is_empty();
                for (k, v) in tags {
                    spec = spec.tags(Tag::builder().key(k).value(v).build());
                }
                let mut req = c
                    .run_instances()
                    .image_id("ami-0foreign")
                    .instance_type("t3.large".into())
                    .min_count(1)
                    .max_count(1);
                if !untagged {
                    req = req.tag_specifications(spec.build());
                }
                let r = req.send().await.unwrap();
                r.instances()[0].instance_id().unwrap().to_string()
            }
        };
        let other = nimbus::core::model::machine_tags("someone-else", "aws", "p", "nimbus.someone-else.p.0", None);
        vec![
            run(other.into_iter().collect()).await,
            run(vec![]).await,
            run(vec![("nimbus:tenant".into(), tenant.to_string()), ("nimbus:pool".into(), "p".into())]).await,
        ]
    }
    async fn alive(&self, id: &str) -> bool {
        let c = sdk().await;
        if id.starts_with("h-") {
            let h = c.describe_hosts().host_ids(id).send().await.unwrap();
            return h.hosts().first().and_then(|h| h.state()).map(|s| s.as_str()) == Some("available");
        }
        let r = c.describe_instances().instance_ids(id).send().await.unwrap();
        let state = r.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_string();
        state == "running" || state == "pending"
    }
    fn ignore_filters(&self, on: bool) -> bool {
        self.proxy.set(|s| s.ignore_filters = on);
        true
    }
    fn throttle(&self, n: u32) -> bool {
        self.proxy.set(|s| s.throttle_next = n);
        true
    }
    fn requests(&self, action: &str) -> usize {
        self.proxy.count(action)
    }
    fn has_hosts(&self) -> bool {
        true
    }
    fn pages(&self) -> bool {
        true
    }
    fn missing_id(&self) -> String {
        "i-0123456789abcdef0".into()
    }
}

#[test]
fn aws_provider_conforms() {
    let Some(url) = peer("NIMBUS_MOTO_URL", "moto (EC2)") else { return };
    use_moto_env(&url);
    let peer = AwsPeer { proxy: Ec2Proxy::start(&url) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(600), run_all(&peer)).await.expect("the suite finishes");
    });
}

// ---------------------------------------------------------------- hetzner (the stateful fake on loopback)

struct HetznerPeer {
    fake: super::hetzner_fake::HetznerFake,
}

impl HetznerPeer {
    fn settings(&self, page_size: u32, attempts: u32) -> nimbus::providers::hetzner::HetznerSettings {
        let mut s = nimbus::providers::hetzner::HetznerSettings::new(self.fake.url.clone(), "test-token");
        s.page_size = page_size;
        s.attempts = attempts;
        s.poll = Duration::from_millis(10);
        s.location = Some("fsn1".into());
        s
    }
}

#[async_trait]
impl Peer for HetznerPeer {
    async fn provider(&self, tenant: &str) -> Arc<dyn Provider> {
        self.tuned(tenant, 50, 5).await
    }
    async fn tuned(&self, tenant: &str, page_size: i32, attempts: u32) -> Arc<dyn Provider> {
        Arc::new(
            nimbus::providers::hetzner::HetznerProvider::new(
                "hetzner",
                tenant,
                self.settings(page_size as u32, attempts),
            )
            .unwrap(),
        )
    }
    async fn plant_foreign(&self, tenant: &str) -> Vec<String> {
        let other = serde_json::json!({"nimbus/tenant": "other", "nimbus/provider": "hetzner", "nimbus/machine": "nimbus.other.p.9", "nimbus/pool": "p"});
        let half = serde_json::json!({"nimbus/tenant": tenant, "nimbus/pool": "p"});
        vec![
            self.fake.plant(&format!("other-{tenant}"), other).to_string(),
            self.fake.plant(&format!("untagged-{tenant}"), serde_json::json!({})).to_string(),
            self.fake.plant(&format!("half-{tenant}"), half).to_string(),
        ]
    }
    async fn alive(&self, id: &str) -> bool {
        self.fake.exists(id)
    }
    fn ignore_filters(&self, on: bool) -> bool {
        self.fake.ignore_selector(on);
        true
    }
    fn throttle(&self, n: u32) -> bool {
        self.fake.throttle(n);
        true
    }
    fn requests(&self, action: &str) -> usize {
        match action {
            "DescribeInstances" => self.fake.requests("GET /servers"),
            _ => 0,
        }
    }
    fn has_hosts(&self) -> bool {
        false
    }
    fn pages(&self) -> bool {
        true
    }
    fn missing_id(&self) -> String {
        "999999".into()
    }
}

/// Issue 22.3: the Hetzner provider passes the provider conformance suite against the stateful fake (label
/// selectors it can be told to ignore, pages, actions that progress over polls, 429s with rate-limit headers).
#[test]
fn hetzner_provider_conforms() {
    let peer = HetznerPeer { fake: super::hetzner_fake::HetznerFake::start() };
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run_all(&peer));
}
