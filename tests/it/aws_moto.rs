//! The AWS provider against moto (a real EC2 Query API on 127.0.0.1):
//! discovery by tags with one call per page, create, scale down with a
//! deferred release, `--at`, release after the window, host reuse, nimbus's
//! own host rules, tenant isolation, and kill-and-rerun without leaks.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use nimbus::providers::Provider;
use nimbus::providers::aws::{AwsProvider, AwsSettings};

fn moto() -> Option<String> {
    let url = peer("NIMBUS_MOTO_URL", "moto (EC2)")?;
    use_moto_env(&url);
    Some(url)
}

fn fleet(tenant: &str, mac: u32, linux: u32, min_allocation: Option<&str>) -> String {
    // A test that shortens the window also drops the safety margin, to see the release happen.
    let min = min_allocation.map(|m| format!("    min_allocation: {m}\n    window_margin: 0s\n")).unwrap_or_default();
    format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  aws:\n    type: aws\n    region: us-east-1\n    post_available_delay: 0s\n{min}pools:\n  - name: mac\n    provider: aws\n    count: {mac}\n    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}\n  - name: linux\n    provider: aws\n    count: {linux}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-east-1a}}\n"
    )
}

struct Fleet {
    dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
    tenant: String,
}

impl Fleet {
    fn new(url: &str, prefix: &str) -> Fleet {
        Fleet { dir: tempfile::tempdir().unwrap(), env: aws_env(url), tenant: unique_tenant(prefix) }
    }
    fn write(&self, mac: u32, linux: u32, min: Option<&str>) {
        std::fs::write(self.dir.path().join("fleet.yaml"), fleet(&self.tenant, mac, linux, min)).unwrap();
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        nimbus_env(self.dir.path(), args, &self.env)
    }
    fn ok(&self, args: &[&str]) -> std::process::Output {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(0), "nimbus {args:?}\n{}", text(&o));
        o
    }
    fn plan_json(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["plan", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_slice(&self.ok(&args).stdout).unwrap()
    }
    async fn provider(&self) -> AwsProvider {
        AwsProvider::new("aws", &self.tenant, AwsSettings { region: Some("us-east-1".into()), ..Default::default() })
            .await
            .unwrap()
    }
}

fn kinds(plan: &serde_json::Value) -> Vec<String> {
    plan["actions"].as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap().to_string()).collect()
}

/// A mac2.metal spec in us-east-1a of `image`, with the user's `tags`.
fn mac_spec(image: &str, tags: nimbus::core::model::UserTags) -> nimbus::core::model::MachineSpec {
    nimbus::core::model::MachineSpec {
        os: nimbus::config::Os::Macos,
        arch: nimbus::config::Arch::Arm64,
        instance_type: Some("mac2.metal".into()),
        image: image.into(),
        availability_zone: Some("us-east-1a".into()),
        fallback_zones: vec![],
        tags,
    }
}

/// Allocates a dedicated host for `machine` of pool `mac` and launches it there from `image`, both with the
/// user's `tags`, through `p`; returns the host and instance ids.
async fn mac_on_its_own_host(
    p: &AwsProvider,
    tenant: &str,
    machine: &str,
    image: &str,
    tags: nimbus::core::model::UserTags,
) -> (String, String) {
    use nimbus::providers::{HostRequest, LaunchRequest};
    let host = p
        .allocate_host(&HostRequest {
            tenant: tenant.to_string(),
            pool: "mac".into(),
            machine: machine.to_string(),
            instance_type: "mac2.metal".into(),
            availability_zone: "us-east-1a".into(),
            fallback_zones: vec![],
            exclude_hosts: vec![],
            idempotency_key: None,
            tags: tags.clone(),
        })
        .await
        .unwrap();
    let id = p
        .launch(&LaunchRequest {
            tenant: tenant.to_string(),
            pool: "mac".into(),
            machine: machine.to_string(),
            spec: mac_spec(image, tags),
            host_id: Some(host.clone()),
            idempotency_key: None,
        })
        .await
        .unwrap();
    (host, id)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Every host and live instance in moto carrying `tenant`'s tag: (host id → state, instance id → host id).
async fn tenant_resources(
    c: &aws_sdk_ec2::Client,
    tenant: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, Option<String>>) {
    let hosts = c.describe_hosts().send().await.unwrap();
    let hosts = hosts
        .hosts()
        .iter()
        .filter(|h| h.tags().iter().any(|t| t.key() == Some("nimbus:tenant") && t.value() == Some(tenant)))
        .map(|h| (h.host_id().unwrap().to_string(), h.state().unwrap().as_str().to_string()))
        .collect();
    // Every page: moto pages at 100 instances by default.
    let mut all = Vec::new();
    let mut next = None;
    loop {
        let page = c.describe_instances().set_next_token(next).send().await.unwrap();
        all.extend(page.reservations().iter().flat_map(|r| r.instances()).cloned());
        next = page.next_token().map(str::to_string);
        if next.is_none() {
            break;
        }
    }
    let instances = all
        .iter()
        .filter(|i| i.tags().iter().any(|t| t.key() == Some("nimbus:tenant") && t.value() == Some(tenant)))
        .filter(|i| {
            !matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated" | "shutting-down"))
        })
        .map(|i| (i.instance_id().unwrap().to_string(), i.placement().and_then(|p| p.host_id()).map(str::to_string)))
        .collect();
    (hosts, instances)
}

#[test]
fn create_discover_scale_down_defer_and_reuse() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "create");
    f.write(2, 1, None);
    let plan = f.plan_json(&[]);
    assert_eq!(kinds(&plan).iter().filter(|k| *k == "allocate_host").count(), 2);
    f.ok(&["apply", "--auto-approve"]);
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));

    rt().block_on(async {
        // Discovery: one DescribeHosts and one DescribeInstances page, not one call per machine.
        let p = f.provider().await;
        let found = p.discover(&f.tenant).await.unwrap();
        assert_eq!(found.machines.len(), 3);
        assert_eq!(found.hosts.len(), 2);
        assert!(found.hosts.iter().all(|h| h.instance_ids.len() == 1 && h.instance_type == "mac2.metal"));
        let calls = p.calls();
        assert_eq!(calls.get("DescribeHosts"), Some(&1), "{calls:?}");
        assert_eq!(calls.get("DescribeInstances"), Some(&1), "{calls:?}");
    });

    // Scale the Mac pool down: the instance goes, its host's release waits for the 24 h window.
    f.write(1, 1, None);
    let plan = f.plan_json(&[]);
    assert_eq!(kinds(&plan), ["terminate_instance"]);
    assert_eq!(plan["deferred"].as_array().unwrap().len(), 1);
    let due: chrono::DateTime<chrono::Utc> = plan["deferred"][0]["due_at"].as_str().unwrap().parse().unwrap();
    let left = due - chrono::Utc::now();
    // 24 hours plus the 5-minute safety margin.
    assert!(left > chrono::Duration::hours(24) && left <= chrono::Duration::minutes(24 * 60 + 5), "{left}");
    f.ok(&["apply", "--auto-approve"]);
    let o = f.ok(&["plan", "--detailed-exitcode"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 deferred"), "{}", text(&o));
    // The peer scrubs the host after its instance ends (NIMBUS_MOTO_SCRUB_SECONDS); wait it out.
    std::thread::sleep(Duration::from_millis(2500));

    // As of 25 hours later, the release is due.
    let later = f.plan_json(&["--at", "+25h"]);
    assert_eq!(kinds(&later), ["release_host"]);
    assert!(later["deferred"].as_array().unwrap().is_empty());

    // Scaling up again reuses the idle host rather than allocating another.
    f.write(2, 1, None);
    let plan = f.plan_json(&[]);
    assert_eq!(kinds(&plan), ["launch_instance", "wait_reachable"]);
    f.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert_eq!(instances.len(), 3);
        let mut placed: Vec<&String> = instances.values().flatten().collect();
        placed.sort();
        let mut ids: Vec<&String> = hosts.keys().collect();
        ids.sort();
        assert_eq!(placed, ids, "one instance per host");
    });
}

#[test]
fn host_is_released_once_its_window_has_passed() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "window");
    f.write(1, 0, Some("8s"));
    f.ok(&["apply", "--auto-approve"]);
    f.write(0, 0, Some("8s"));
    let plan = f.plan_json(&[]);
    if kinds(&plan).contains(&"release_host".to_string()) {
        panic!("planned a release inside the window: {plan}");
    }
    assert_eq!(plan["deferred"].as_array().unwrap().len(), 1);
    f.ok(&["apply", "--auto-approve"]);
    std::thread::sleep(Duration::from_millis(8500));
    // Past the window: the release is planned (unless the apply above already ran after the window).
    let plan = f.plan_json(&[]);
    let k = kinds(&plan);
    assert!(k.is_empty() || k == ["release_host"], "{k:?}");
    assert!(plan["deferred"].as_array().unwrap().is_empty());
    f.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
        assert!(instances.is_empty());
        assert!(hosts.values().all(|s| s == "released"), "{hosts:?}");
    });
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

#[test]
fn provider_enforces_host_rules_itself() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "rules");
    f.write(1, 0, None);
    f.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let p = f.provider().await;
        let found = p.discover(&f.tenant).await.unwrap();
        let host = found.hosts[0].id.clone();
        let e = p.release_host(&host).await.unwrap_err().to_string();
        assert!(e.contains("still has an instance"), "{e}");
        let m = &found.machines[0];
        let r = nimbus::providers::MachineRef {
            name: m.name().unwrap().into(),
            instance_id: Some(m.instance_id.clone()),
            address: None,
        };
        p.terminate(&r).await.unwrap();
        let e = p.release_host(&host).await.unwrap_err().to_string();
        assert!(e.contains("inside its minimum allocation window"), "{e}");
        // Another tenant's provider cannot touch it at all.
        let other = AwsProvider::new(
            "aws",
            "someone-else",
            AwsSettings { region: Some("us-east-1".into()), ..Default::default() },
        )
        .await
        .unwrap();
        let e = other.release_host(&host).await.unwrap_err().to_string();
        assert!(e.contains("not tagged for tenant"), "{e}");
        let (hosts, _) = tenant_resources(&sdk().await, &f.tenant).await;
        // Not released: the host is scrubbing after its instance ended, as on real EC2.
        assert_eq!(hosts[&host], "pending");
    });
}

#[test]
fn other_tenants_and_untagged_resources_survive() {
    let Some(url) = moto() else { return };
    let mine = Fleet::new(&url, "mine");
    let theirs = Fleet::new(&url, "theirs");
    theirs.write(1, 1, Some("0s"));
    theirs.ok(&["apply", "--auto-approve"]);
    let (untagged_host, untagged_instance, half_tagged) = rt().block_on(async {
        let c = sdk().await;
        let h = c
            .allocate_hosts()
            .instance_type("mac2.metal")
            .availability_zone("us-east-1a")
            .quantity(1)
            .send()
            .await
            .unwrap();
        let i = c
            .run_instances()
            .image_id("ami-0abc")
            .instance_type("t3.large".into())
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .unwrap();
        // Carries our tenant's tag but not nimbus:managed-by: not ours to manage.
        let half = c
            .run_instances()
            .image_id("ami-0abc")
            .instance_type("t3.large".into())
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("nimbus:tenant").value(&mine.tenant).build())
                    .tags(Tag::builder().key("nimbus:pool").value("linux").build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        (
            h.host_ids()[0].clone(),
            i.instances()[0].instance_id().unwrap().to_string(),
            half.instances()[0].instance_id().unwrap().to_string(),
        )
    });

    mine.write(1, 1, Some("0s"));
    mine.ok(&["apply", "--auto-approve"]);
    mine.write(0, 0, Some("0s"));
    let plan = mine.plan_json(&[]);
    let all = plan.to_string();
    for id in [&untagged_host, &untagged_instance, &half_tagged] {
        assert!(!all.contains(id.as_str()), "{id} appears in the plan");
    }
    assert!(!all.contains(&theirs.tenant));
    mine.ok(&["apply", "--auto-approve"]);

    rt().block_on(async {
        let c = sdk().await;
        let (their_hosts, their_instances) = tenant_resources(&c, &theirs.tenant).await;
        assert_eq!(their_hosts.values().filter(|s| *s == "available").count(), 1);
        assert_eq!(their_instances.len(), 2);
        let h = c.describe_hosts().host_ids(&untagged_host).send().await.unwrap();
        assert_eq!(h.hosts()[0].state().unwrap().as_str(), "available");
        for id in [&untagged_instance, &half_tagged] {
            let i = c.describe_instances().instance_ids(id).send().await.unwrap();
            let state = i.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_string();
            assert!(state == "running" || state == "pending", "{id} is {state}");
        }
        let (my_hosts, my_instances) = tenant_resources(&c, &mine.tenant).await;
        assert!(my_instances.keys().all(|i| i == &half_tagged), "{my_instances:?}");
        assert!(my_hosts.values().all(|s| s == "released"));
    });
}

#[test]
fn killed_apply_reruns_without_duplicates_or_leaks() {
    let Some(url) = moto() else { return };
    let mut partial = 0;
    for (round, kill_ms) in [30u64, 60, 90, 120, 160, 220, 300, 400].into_iter().enumerate() {
        let f = Fleet::new(&url, &format!("kill{round}"));
        f.write(3, 2, None);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["apply", "--auto-approve", "--parallelism", "1"])
            .current_dir(f.dir.path())
            .envs(f.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(kill_ms));
        let _ = child.kill();
        let _ = child.wait();
        let (hosts, instances) = rt().block_on(async { tenant_resources(&sdk().await, &f.tenant).await });
        if hosts.len() + instances.len() < 8 {
            partial += 1;
        }
        f.ok(&["apply", "--auto-approve"]);
        assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0), "round {round}");
        rt().block_on(async {
            let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
            assert_eq!(hosts.len(), 3, "round {round}: hosts {hosts:?}");
            assert_eq!(instances.len(), 5, "round {round}: instances {instances:?}");
            let mut on: Vec<&String> = instances.values().flatten().collect();
            on.sort();
            on.dedup();
            assert_eq!(on.len(), 3, "round {round}: each host runs one instance");
        });
    }
    assert!(partial >= 2, "only {partial} kill(s) landed mid-apply");
}

#[test]
fn discovery_filters_even_when_the_server_does_not() {
    let Some(url) = moto() else { return };
    // A filter moto cannot apply (tag on hosts is patched; this one checks our own client-side filtering).
    let f = Fleet::new(&url, "filter");
    f.write(1, 1, Some("0s"));
    f.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let c = sdk().await;
        let all = c
            .describe_hosts()
            .filter(Filter::builder().name("tag-key").values("nimbus:tenant").build())
            .send()
            .await
            .unwrap();
        assert!(!all.hosts().is_empty());
        let p = f.provider().await;
        let found = p.discover(&f.tenant).await.unwrap();
        assert!(found.hosts.iter().all(|h| h.tags["nimbus:tenant"] == f.tenant));
        assert!(found.machines.iter().all(|m| m.tags["nimbus:tenant"] == f.tenant));
    });
}

// ---------------------------------------------------------------- issue 9 regressions

fn two_providers_fleet(tenant: &str, second_region: &str, second_az: &str, linux: u32) -> String {
    format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  mac:\n    type: aws\n    region: us-east-1\n  linux:\n    type: aws\n    region: {second_region}\n    key_name: linux-key\npools:\n  - name: mac\n    provider: mac\n    count: 1\n    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}\n  - name: linux\n    provider: linux\n    count: {linux}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: {second_az}}}\n"
    )
}

/// Issue 9.1: two `aws` providers in one region, and in two regions, each see and change only their own.
#[test]
fn two_aws_providers_keep_their_own_machines() {
    let Some(url) = moto() else { return };
    for (region, az) in [("us-east-1", "us-east-1a"), ("us-west-2", "us-west-2a")] {
        let f = Fleet::new(&url, "twoprov");
        std::fs::write(f.dir.path().join("fleet.yaml"), two_providers_fleet(&f.tenant, region, az, 2)).unwrap();
        f.ok(&["apply", "--auto-approve"]);
        let o = f.run(&["plan", "--detailed-exitcode"]);
        assert_eq!(o.status.code(), Some(0), "{region}: the next plan has nothing to do\n{}", text(&o));
        let o = f.ok(&["apply", "--auto-approve"]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("No changes."), "{}", text(&o));
        // Scaling one provider's pool touches only that provider's machines.
        std::fs::write(f.dir.path().join("fleet.yaml"), two_providers_fleet(&f.tenant, region, az, 1)).unwrap();
        let plan = f.plan_json(&[]);
        assert_eq!(kinds(&plan), ["terminate_instance"], "{region}: {plan}");
        assert_eq!(plan["actions"][0]["provider"], "linux");
        f.ok(&["apply", "--auto-approve"]);
        assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0), "{region}");
        rt().block_on(async {
            let p = AwsProvider::new(
                "mac",
                &f.tenant,
                AwsSettings { region: Some("us-east-1".into()), ..Default::default() },
            )
            .await
            .unwrap();
            let found = p.discover(&f.tenant).await.unwrap();
            assert_eq!(found.machines.len(), 1, "{region}: the `mac` provider sees its own machine only");
            assert!(found.machines.iter().all(|m| &m.tags["nimbus:provider"] == "mac"));
            assert_eq!(found.hosts.len(), 1);
            assert!(found.unusable.is_empty());
        });
    }
}

/// Issue 9.2: a host a killed apply left tagged for `mac.1` is reused once; `mac.1`'s allocation does not
/// find it again by its stale tag, and no host gets two instances.
#[test]
fn a_leftover_host_is_not_doubled_up() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "leftover");
    f.write(2, 0, None);
    let host = rt().block_on(async {
        let c = sdk().await;
        let mut spec = TagSpecification::builder().resource_type(ResourceType::DedicatedHost);
        for (k, v) in
            nimbus::core::model::machine_tags(&f.tenant, "aws", "mac", &format!("nimbus.{}.mac.1", f.tenant), None)
        {
            spec = spec.tags(Tag::builder().key(k).value(v).build());
        }
        let h = c
            .allocate_hosts()
            .instance_type("mac2.metal")
            .availability_zone("us-east-1a")
            .quantity(1)
            .tag_specifications(spec.build())
            .send()
            .await
            .unwrap();
        h.host_ids()[0].clone()
    });
    f.ok(&["apply", "--auto-approve"]);
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
    rt().block_on(async {
        let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert!(hosts.contains_key(&host), "the leftover host was reused");
        let mut on: Vec<&String> = instances.values().flatten().collect();
        on.sort();
        on.dedup();
        assert_eq!((instances.len(), on.len()), (2, 2), "one instance per host: {instances:?}");
    });
}

/// Issue 9.9: an EC2 error shows the service's code and message, not the SDK's debug dump.
#[test]
fn aws_errors_show_code_and_message_only() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "awserr");
    let text_ = fleet(&f.tenant, 0, 1, None)
        .replace("    region: us-east-1\n", "    region: us-east-1\n    subnet_id: subnet-0doesnotexist\n");
    std::fs::write(f.dir.path().join("fleet.yaml"), text_).unwrap();
    let o = f.run(&["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("RunInstances: InvalidSubnetID.NotFound"), "{err}");
    for noise in ["headers", "x-amzn", "HttpResponse", "SdkBody", "ServiceError {"] {
        assert!(!err.contains(noise), "raw SDK output ({noise}) in: {err}");
    }
    assert!(err.lines().all(|l| l.len() < 400), "{err}");
}

/// Issue 11: an EC2 Mac is reimaged with a new root volume (CreateReplaceRootVolumeTask): same instance, same
/// host, new image and root volume, the old volume deleted. moto gains the operation from the peers' patch;
/// nimbus's request is checked against the EC2 service model botocore ships (the official API description).
#[test]
fn a_mac_is_reimaged_on_its_own_host() {
    use nimbus::providers::MachineRef;
    let Some(url) = moto() else { return };
    let proxy = crate::conformance::ec2_proxy::Ec2Proxy::start(&url);
    let tenant = unique_tenant("reimage");
    let machine = format!("nimbus.{tenant}.mac.0");
    rt().block_on(async {
        let p = AwsProvider::new(
            "aws",
            &tenant,
            AwsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(proxy.url.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let (host, id) = mac_on_its_own_host(&p, &tenant, &machine, "ami-0old", Default::default()).await;
        let c = sdk().await;
        let root = |i: &aws_sdk_ec2::types::Instance| {
            i.block_device_mappings().iter().find_map(|b| b.ebs().and_then(|e| e.volume_id()).map(str::to_string))
        };
        let describe = || async {
            c.describe_instances().instance_ids(&id).send().await.unwrap().reservations()[0].instances()[0].clone()
        };
        let before = describe().await;
        let old_volume = root(&before).expect("a root volume");
        let r = MachineRef { name: machine.clone(), instance_id: Some(id.clone()), address: None };
        p.reimage(&r, "ami-0fresh").await.unwrap();
        let after = describe().await;
        assert_eq!(after.state().unwrap().name().unwrap().as_str(), "running");
        assert_eq!(after.image_id(), Some("ami-0fresh"));
        assert_eq!(after.placement().and_then(|p| p.host_id()), Some(host.as_str()), "same host");
        let new_volume = root(&after).expect("a root volume");
        assert_ne!(new_volume, old_volume, "a fresh root volume");
        let vols = c.describe_volumes().send().await.unwrap();
        assert!(
            !vols.volumes().iter().any(|v| v.volume_id() == Some(old_volume.as_str())),
            "the old volume is deleted"
        );
        assert!(p.calls().get("AllocateHosts") == Some(&1) && !p.calls().contains_key("ReleaseHosts"));
        // Someone else's instance is never reimaged.
        let other = AwsProvider::new(
            "aws",
            "someone-else",
            AwsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(proxy.url.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(other.reimage(&r, "ami-0evil").await.is_err());
    });
    // The request, against the official API description.
    let body = proxy
        .state
        .lock()
        .unwrap()
        .bodies
        .iter()
        .find(|b| b.contains("Action=CreateReplaceRootVolumeTask"))
        .cloned()
        .unwrap();
    check_against_model(&ec2_model(), &body).unwrap();
    let sent: Vec<&str> = body.split('&').filter_map(|kv| kv.split('=').next()).collect();
    assert!(sent.contains(&"ImageId") && sent.contains(&"DeleteReplacedRootVolume"), "{body}");
}

/// botocore's EC2 service model (the official API description), as scripts/peers.sh finds it.
fn ec2_model() -> serde_json::Value {
    let path = std::env::var("NIMBUS_EC2_SERVICE_MODEL").expect("scripts/peers.sh exports the EC2 model");
    let json = std::process::Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
    serde_json::from_slice(&json.stdout).unwrap()
}

/// One Query request (`Action=…&Version=…&…`) resolved through its operation's input shape, as botocore's EC2
/// serializer writes it: a member by its `queryName`, else its `locationName` capitalised, else its name; a list
/// flattened as `Name.N` (N from 1); each value of an enum one of its values; every required member present.
fn check_against_model(model: &serde_json::Value, body: &str) -> Result<(), String> {
    let pairs: Vec<(String, String)> = body
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let action = get("Action").ok_or(format!("no Action in {body}"))?;
    if get("Version").as_deref() != Some(model["metadata"]["apiVersion"].as_str().unwrap()) {
        return Err(format!("{action}: Version is not the model's {}", model["metadata"]["apiVersion"]));
    }
    let op = &model["operations"][&action];
    let input = op["input"]["shape"].as_str().ok_or(format!("`{action}` is not an EC2 operation"))?;
    let shapes = &model["shapes"];
    let serialized = |name: &str, m: &serde_json::Value| -> String {
        if let Some(q) = m["queryName"].as_str() {
            return q.to_string();
        }
        match m["locationName"].as_str() {
            Some(l) => l[..1].to_uppercase() + &l[1..],
            None => name.to_string(),
        }
    };
    for (key, value) in pairs.iter().filter(|(k, _)| k != "Action" && k != "Version") {
        let mut shape = &shapes[input];
        for seg in key.split('.') {
            shape = match shape["type"].as_str() {
                Some("structure") => {
                    let member = shape["members"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .find(|(n, m)| serialized(n, m) == seg)
                        .map(|(_, m)| m)
                        .ok_or(format!("{action}: `{key}`: `{seg}` is not a member"))?;
                    &shapes[member["shape"].as_str().unwrap()]
                }
                Some("list") => {
                    seg.parse::<usize>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or(format!("{action}: `{key}`: `{seg}` is not a list index"))?;
                    &shapes[shape["member"]["shape"].as_str().unwrap()]
                }
                t => return Err(format!("{action}: `{key}`: `{seg}` is below a {t:?}")),
            };
        }
        let t = shape["type"].as_str().unwrap_or_default();
        if matches!(t, "structure" | "list" | "map") {
            return Err(format!("{action}: `{key}` names a {t}, not a value"));
        }
        if let Some(values) = shape["enum"].as_array()
            && !values.iter().any(|v| v == value)
        {
            return Err(format!("{action}: `{key}={value}` is not one of {values:?}"));
        }
        if t == "integer" && value.parse::<i64>().is_err()
            || t == "boolean" && !["true", "false"].contains(&value.as_str())
        {
            return Err(format!("{action}: `{key}={value}` is not a {t}"));
        }
    }
    let members = shapes[input]["members"].as_object().unwrap();
    for req in shapes[input]["required"].as_array().into_iter().flatten() {
        let name = serialized(req.as_str().unwrap(), &members[req.as_str().unwrap()]);
        if !pairs.iter().any(|(k, _)| k == &name || k.starts_with(&format!("{name}."))) {
            return Err(format!("{action}: the required `{name}` is missing"));
        }
    }
    Ok(())
}

/// Issue 23: nimbus writes its own EC2 requests, so each one it sends over a machine's whole life (allocate,
/// launch on the host, discover, retag, reimage, terminate, release; a Linux launch with subnet, security groups
/// and key) is checked against botocore's EC2 model, and every operation in `EC2_OPERATIONS` is among them.
#[test]
fn every_ec2_request_fits_the_service_model() {
    use nimbus::providers::{HostRequest, LaunchRequest, MachineRef};
    let Some(url) = moto() else { return };
    let model = ec2_model();
    let proxy = crate::conformance::ec2_proxy::Ec2Proxy::start(&url);
    let tenant = unique_tenant("model");
    let settings = || AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(proxy.url.clone()),
        min_allocation: Some(Duration::ZERO),
        window_margin: Some(Duration::ZERO),
        page_size: Some(5),
        ..Default::default()
    };
    rt().block_on(async {
        let p = AwsProvider::new("aws", &tenant, settings()).await.unwrap();
        let machine = format!("nimbus.{tenant}.mac.0");
        let tags: nimbus::core::model::UserTags = [("team".to_string(), "a b&c".to_string())].into();
        let (host, id) = mac_on_its_own_host(&p, &tenant, &machine, "ami-0old", tags).await;
        assert_eq!(p.discover(&tenant).await.unwrap().machines.len(), 1);
        let r = MachineRef { name: machine.clone(), instance_id: Some(id), address: None };
        let set: nimbus::core::model::UserTags = [("team".to_string(), "b".to_string())].into();
        p.update_tags(&r, Some(&host), &set, &["gone".to_string()]).await.unwrap();
        p.reimage(&r, "ami-0fresh").await.unwrap();
        p.terminate(&r).await.unwrap();
        // A second, unused host is released (its window is zero here).
        let spare = p
            .allocate_host(&HostRequest {
                tenant: tenant.clone(),
                pool: "mac".into(),
                machine: format!("nimbus.{tenant}.mac.1"),
                instance_type: "mac2.metal".into(),
                availability_zone: "us-east-1a".into(),
                fallback_zones: vec![],
                exclude_hosts: vec![],
                idempotency_key: Some("k".into()),
                tags: Default::default(),
            })
            .await
            .unwrap();
        p.release_host(&spare).await.unwrap();
        // A Linux instance in a subnet with security groups and a key pair: moto refuses the made-up ids, but
        // the request is what EC2 would get.
        let linux = AwsProvider::new(
            "aws",
            &tenant,
            AwsSettings {
                subnet_id: Some("subnet-0abc".into()),
                security_group_ids: vec!["sg-01".into(), "sg-02".into()],
                key_name: Some("ops".into()),
                ..settings()
            },
        )
        .await
        .unwrap();
        let _ = linux
            .launch(&LaunchRequest {
                tenant: tenant.clone(),
                pool: "linux".into(),
                machine: format!("nimbus.{tenant}.linux.0"),
                spec: nimbus::core::model::MachineSpec {
                    os: nimbus::config::Os::Linux,
                    arch: nimbus::config::Arch::X86_64,
                    instance_type: Some("t3.large".into()),
                    image: "ami-0linux".into(),
                    availability_zone: Some("us-east-1b".into()),
                    fallback_zones: vec![],
                    tags: Default::default(),
                },
                host_id: None,
                idempotency_key: None,
            })
            .await;
    });
    let bodies = proxy.state.lock().unwrap().bodies.clone();
    for b in &bodies {
        check_against_model(&model, b).unwrap();
    }
    let linux = bodies.iter().find(|b| b.contains("SecurityGroupId.2=sg-02")).expect("the Linux launch was sent");
    for k in ["SubnetId=subnet-0abc", "KeyName=ops", "Placement.AvailabilityZone=us-east-1b"] {
        assert!(linux.contains(k), "{k} in {linux}");
    }
    for op in nimbus::providers::aws::EC2_OPERATIONS {
        assert!(bodies.iter().any(|b| b.starts_with(&format!("Action={op}&"))), "{op} was not sent: {bodies:?}");
    }
    // The checker has teeth: a misspelt member, a list without its index and a bad enum value are refused.
    for bad in [
        "Action=CreateTags&Version=2016-11-15&ResourceId.1=i-1&Tags.1.Key=a",
        "Action=TerminateInstances&Version=2016-11-15&InstanceId=i-1",
        "Action=AllocateHosts&Version=2016-11-15&InstanceType=mac2.metal&AvailabilityZone=a&Quantity=1&TagSpecification.1.ResourceType=host",
        "Action=DescribeHosts&Version=2016-11-15&MaxResults=many",
        "Action=RunInstances&Version=2016-11-15&MinCount=1&ImageId=ami-1",
    ] {
        assert!(check_against_model(&model, bad).is_err(), "{bad}");
    }
}

/// Issue 12: the allocation's lookup by tag takes only a usable host of the kind asked for: a host left tagged
/// for the machine but of its old instance type (or zone) is not adopted.
#[test]
fn allocation_never_adopts_a_host_of_another_kind() {
    use nimbus::providers::HostRequest;
    let Some(_) = moto() else { return };
    let tenant = unique_tenant("kind");
    let machine = format!("nimbus.{tenant}.mac.0");
    rt().block_on(async {
        let c = sdk().await;
        let mut spec = TagSpecification::builder().resource_type(ResourceType::DedicatedHost);
        for (k, v) in nimbus::core::model::machine_tags(&tenant, "aws", "mac", &machine, None) {
            spec = spec.tags(Tag::builder().key(k).value(v).build());
        }
        let old = c
            .allocate_hosts()
            .instance_type("mac1.metal")
            .availability_zone("us-east-1a")
            .quantity(1)
            .tag_specifications(spec.build())
            .send()
            .await
            .unwrap()
            .host_ids()[0]
            .clone();
        let p =
            AwsProvider::new("aws", &tenant, AwsSettings { region: Some("us-east-1".into()), ..Default::default() })
                .await
                .unwrap();
        let req = |itype: &str, az: &str| HostRequest {
            tenant: tenant.clone(),
            pool: "mac".into(),
            machine: machine.clone(),
            instance_type: itype.into(),
            availability_zone: az.into(),
            fallback_zones: vec![],
            exclude_hosts: vec![],
            idempotency_key: None,
            tags: Default::default(),
        };
        let new = p.allocate_host(&req("mac2.metal", "us-east-1a")).await.unwrap();
        assert_ne!(new, old, "a host of the old instance type was adopted");
        assert_eq!(p.allocate_host(&req("mac2.metal", "us-east-1a")).await.unwrap(), new, "found again by its tags");
        let other_zone = p.allocate_host(&req("mac2.metal", "us-east-1b")).await.unwrap();
        assert!(other_zone != new && other_zone != old);
        // Generations: with a journaled key, a rerun of the same creation adopts its host; a later creation of
        // the same machine (a new key) never adopts an earlier generation's host, even one of the right kind.
        let keyed = |key: &str| HostRequest { idempotency_key: Some(key.into()), ..req("mac2.metal", "us-east-1c") };
        let first = p.allocate_host(&keyed("generation-one")).await.unwrap();
        let rerun = p.allocate_host(&keyed("generation-one")).await.unwrap();
        assert_eq!(rerun, first, "the same creation finds its own host");
        let next = p.allocate_host(&keyed("generation-two")).await.unwrap();
        assert!(![first.as_str(), new.as_str(), old.as_str(), other_zone.as_str()].contains(&next.as_str()));
        let tags = c.describe_hosts().host_ids(&next).send().await.unwrap().hosts()[0].tags().to_vec();
        let g = tags.iter().find(|t| t.key() == Some("nimbus:generation")).and_then(|t| t.value()).unwrap();
        assert!(g.len() == 16 && !g.contains("generation-two"), "a digest, not the key: {g}");
    });
}

/// Issue 12: a pool may list several zones; allocation tries them in order, and a zone without Mac capacity
/// (EC2's `InsufficientHostCapacity`, made by the loopback proxy since moto never runs out) gives way to the
/// next. With every zone refused, the error is a typed Capacity error.
#[test]
fn allocation_falls_back_through_the_pools_zones() {
    use nimbus::providers::{HostRequest, ProviderError};
    let Some(url) = moto() else { return };
    let proxy = crate::conformance::ec2_proxy::Ec2Proxy::start(&url);
    proxy.set(|s| s.refuse_zone = Some("us-east-1a".into()));
    let tenant = unique_tenant("zones");
    rt().block_on(async {
        let p = AwsProvider::new(
            "aws",
            &tenant,
            AwsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(proxy.url.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let req = |fallback: Vec<String>| HostRequest {
            tenant: tenant.clone(),
            pool: "mac".into(),
            machine: format!("nimbus.{tenant}.mac.0"),
            instance_type: "mac2.metal".into(),
            availability_zone: "us-east-1a".into(),
            fallback_zones: fallback,
            exclude_hosts: vec![],
            idempotency_key: None,
            tags: Default::default(),
        };
        let e = p.allocate_host(&req(vec![])).await.unwrap_err();
        assert!(matches!(e, ProviderError::Capacity { .. }), "{e:?}");
        let host = p.allocate_host_in_zone(&req(vec!["us-east-1b".into()])).await.unwrap();
        assert_eq!(host.availability_zone, "us-east-1b", "says the zone it used");
        let h = sdk().await.describe_hosts().host_ids(&host.host_id).send().await.unwrap();
        assert_eq!(h.hosts()[0].availability_zone(), Some("us-east-1b"));
        // Found again by its tags: the same host, in the zone it is really in.
        assert_eq!(p.allocate_host_in_zone(&req(vec!["us-east-1b".into()])).await.unwrap(), host);
    });
    // The plan carries the zones in order.
    let cfg = nimbus::config::parse(
        "f",
        "version: 1\ntenant: z\nproviders:\n  aws: {type: aws}\npools:\n  - name: mac\n    provider: aws\n    count: 1\n    machine: {os: macos, arch: arm64, instance_type: mac2.metal, image: ami-1, availability_zones: [us-east-1a, us-east-1b]}\n",
    )
    .unwrap();
    let d = nimbus::core::model::Desired::from_config(&cfg);
    let plan = nimbus::core::plan::plan(&d, &nimbus::core::model::Actual::default(), chrono::Utc::now());
    let alloc = plan.actions().find(|(_, a)| a.kind.name() == "allocate_host").unwrap().1.kind.clone();
    match alloc {
        nimbus::core::plan::ActionKind::AllocateHost { availability_zone, fallback_zones, .. } => {
            assert_eq!((availability_zone.as_str(), fallback_zones), ("us-east-1a", vec!["us-east-1b".to_string()]));
        }
        other => panic!("{other:?}"),
    }
}

/// Issue 12: when the provider's clock (EC2's `Date` header) and this computer's differ by more than a minute,
/// the plan says so (host windows are judged on this computer's clock, with `window_margin` to spare).
#[test]
fn a_provider_clock_far_off_is_warned_about() {
    let Some(url) = moto() else { return };
    let proxy = crate::conformance::ec2_proxy::Ec2Proxy::start(&url);
    let f = Fleet::new(&url, "clock");
    f.write(0, 1, None);
    let through_proxy: Vec<(&str, String)> = f
        .env
        .iter()
        .map(|(k, v)| (*k, if k.starts_with("AWS_ENDPOINT_URL") { proxy.url.clone() } else { v.clone() }))
        .collect();
    let o = nimbus_env(f.dir.path(), &["plan"], &through_proxy);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("provider's clock"), "no warning for a clock in step: {}", text(&o));
    proxy.set(|s| s.date_skew_secs = Some(-600));
    let o = nimbus_env(f.dir.path(), &["plan"], &through_proxy);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("provider's clock is 600s behind this computer's")
            || text(&o).contains("provider's clock is 599s behind"),
        "{}",
        text(&o)
    );
}

/// Issue 12: the EC2 peer scrubs a Mac host after its instance ends (the project's moto patch). A replacement
/// (a new image) terminates now, waits while the host scrubs, and then launches on the same host: no second
/// host, no launch on a scrubbing host.
#[test]
fn a_mac_replacement_waits_for_the_scrub_on_the_peer() {
    let Some(url) = moto() else { return };
    let secs: f64 = std::env::var("NIMBUS_MOTO_SCRUB_SECONDS").expect("scripts/peers.sh sets it").parse().unwrap();
    assert!(secs > 0.0, "the peer must scrub");
    let f = Fleet::new(&url, "scrub");
    f.write(1, 0, None);
    f.ok(&["apply", "--auto-approve"]);
    let host = rt().block_on(async { tenant_resources(&sdk().await, &f.tenant).await.0.into_keys().next().unwrap() });
    let text_ =
        std::fs::read_to_string(f.dir.path().join("fleet.yaml")).unwrap().replace("image: ami-0abc", "image: ami-0new");
    std::fs::write(f.dir.path().join("fleet.yaml"), text_).unwrap();
    let o = f.ok(&["apply", "--auto-approve"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("scrubbed"), "{}", text(&o));
    rt().block_on(async {
        let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
        assert_eq!(hosts[&host], "pending", "the peer scrubs the host");
        assert!(instances.is_empty());
    });
    // While it scrubs, the machine waits for its own host; nothing is allocated.
    let plan = f.plan_json(&[]);
    assert!(kinds(&plan).is_empty(), "{plan}");
    assert!(plan["deferred"].to_string().contains("waiting for its host"), "{plan}");
    std::thread::sleep(Duration::from_millis((secs * 1000.0) as u64 + 500));
    f.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let (hosts, instances) = tenant_resources(&sdk().await, &f.tenant).await;
        assert_eq!(hosts.len(), 1, "no second host: {hosts:?}");
        assert_eq!(instances.values().flatten().collect::<Vec<_>>(), [&host], "relaunched on the same host");
    });
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// An apply killed right after each mutating call of a 3-machine Mac + Linux fleet returned (the
/// `NIMBUS_FAILPOINT=after:` test facility), rerun at once in the peer's read-lagged region, where discovery
/// does not yet see what the killed run made: the rerun sends the journaled ClientTokens again, the peer
/// returns what the first calls made, and the fleet converges with exactly one host and three instances.
#[test]
fn a_killed_apply_reruns_with_its_journaled_client_tokens_under_read_lag() {
    let Some(url) = moto() else { return };
    let lag: f64 = std::env::var("NIMBUS_MOTO_READ_LAG_SECONDS").expect("scripts/peers.sh sets it").parse().unwrap();
    assert!(lag > 0.0, "the peer must lag reads");
    let region = std::env::var("NIMBUS_MOTO_LAG_REGION").expect("scripts/peers.sh sets it");
    for point in ["after:AllocateHosts:1", "after:RunInstances:1", "after:RunInstances:2", "after:RunInstances:3"] {
        let f = Fleet::new(&url, "lag");
        std::fs::write(f.dir.path().join("fleet.yaml"), fleet(&f.tenant, 1, 2, None).replace("us-east-1", &region))
            .unwrap();
        let mut env = f.env.clone();
        env.push(("NIMBUS_FAILPOINT", point.to_string()));
        let killed = nimbus_env(f.dir.path(), &["apply", "--auto-approve"], &env);
        assert!(!killed.status.success(), "{point}: the failpoint must abort the apply\n{}", text(&killed));
        assert!(String::from_utf8_lossy(&killed.stderr).contains("failpoint"), "{point}\n{}", text(&killed));
        // At once: the peer still hides from discovery what the killed run made.
        f.ok(&["apply", "--auto-approve"]);
        std::thread::sleep(Duration::from_millis((lag * 1000.0) as u64 + 500));
        rt().block_on(async {
            let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
            let c = aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::config::Builder::from(&cfg)
                    .region(aws_sdk_ec2::config::Region::new(region.clone()))
                    .build(),
            );
            let (hosts, instances) = tenant_resources(&c, &f.tenant).await;
            assert_eq!(hosts.len(), 1, "{point}: hosts {hosts:?}");
            assert_eq!(instances.len(), 3, "{point}: instances {instances:?}");
        });
        assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0), "{point}");
        // The journal records the zone the host is in.
        let j = nimbus::state::journal::Journal::open(&f.dir.path().join(".nimbus/journal.db")).unwrap();
        let events = j.events(1000).unwrap();
        let zone = format!("{region}a");
        assert!(
            events.iter().any(|e| e.message.contains(&format!("is in {zone}"))
                && e.details.as_ref().is_some_and(|d| d.contains(&format!("\"availability_zone\":\"{zone}\"")))),
            "{point}: {:?}",
            events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
    }
}

/// A machine created again later (scaled to zero, then back) gets a new ClientToken: the peer, which honours
/// tokens, would otherwise hand back the terminated instance.
#[test]
fn a_machine_created_again_gets_a_new_client_token() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "anew");
    f.write(0, 1, None);
    f.ok(&["apply", "--auto-approve"]);
    let first = rt().block_on(async { tenant_resources(&sdk().await, &f.tenant).await.1 });
    assert_eq!(first.len(), 1);
    f.write(0, 0, None);
    f.ok(&["apply", "--auto-approve"]);
    f.write(0, 1, None);
    f.ok(&["apply", "--auto-approve"]);
    let again = rt().block_on(async { tenant_resources(&sdk().await, &f.tenant).await.1 });
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again.keys().next(), first.keys().next(), "a new instance, not the terminated one");
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 13: a launch never retags (or uses) a host that another tenant owns.
#[test]
fn a_launch_never_retags_another_tenants_host() {
    use nimbus::providers::LaunchRequest;
    let Some(url) = moto() else { return };
    let owner = Fleet::new(&url, "owner");
    owner.write(1, 0, None);
    owner.ok(&["apply", "--auto-approve"]);
    rt().block_on(async {
        let c = sdk().await;
        let (hosts, _) = tenant_resources(&c, &owner.tenant).await;
        let host = hosts.keys().next().unwrap().clone();
        let intruder = unique_tenant("intruder");
        let p =
            AwsProvider::new("aws", &intruder, AwsSettings { region: Some("us-east-1".into()), ..Default::default() })
                .await
                .unwrap();
        let e = p
            .launch(&LaunchRequest {
                tenant: intruder.clone(),
                pool: "mac".into(),
                machine: format!("nimbus.{intruder}.mac.0"),
                spec: mac_spec("ami-0abc", Default::default()),
                host_id: Some(host.clone()),
                idempotency_key: None,
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing") && e.contains("not tagged for this tenant"), "{e}");
        let h = c.describe_hosts().host_ids(&host).send().await.unwrap();
        let tags = h.hosts()[0].tags();
        let tenant = tags.iter().find(|t| t.key() == Some("nimbus:tenant")).and_then(|t| t.value());
        assert_eq!(tenant, Some(owner.tenant.as_str()), "the host was retagged: {tags:?}");
        assert!(tenant_resources(&c, &intruder).await.1.is_empty(), "nothing launched for the intruder");
    });
}

/// Issue 13.5: what a fleet file makes carries its `nimbus:fleet` tag; a second fleet file of the same tenant
/// (even one declaring pools of the same names, at count 0) leaves it alone.
#[test]
fn a_second_fleet_file_of_the_tenant_leaves_the_first_ones_instances_alone() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "fleets");
    f.write(0, 1, None);
    f.ok(&["apply", "--auto-approve"]);
    std::fs::write(f.dir.path().join("other.yaml"), fleet(&f.tenant, 0, 0, None)).unwrap();
    let o = f.run(&["plan", "-f", "other.yaml", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "the other fleet file plans nothing\n{}", text(&o));
    rt().block_on(async {
        let c = sdk().await;
        let (_, instances) = tenant_resources(&c, &f.tenant).await;
        assert_eq!(instances.len(), 1);
        let id = instances.keys().next().unwrap();
        let out = c.describe_instances().instance_ids(id).send().await.unwrap();
        let tags = out.reservations()[0].instances()[0].tags();
        assert!(tags.iter().any(|t| t.key() == Some("nimbus:fleet") && t.value() == Some("fleet.yaml")), "{tags:?}");
    });
    // The first fleet file still sees its own machine.
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// A region's EC2 client.
async fn sdk_in(region: &str) -> aws_sdk_ec2::Client {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&cfg).region(aws_sdk_ec2::config::Region::new(region.to_string())).build(),
    )
}

/// Issue 18.6: one name, one machine. A second instance launched by hand with exactly `linux[0]`'s tags is a
/// copy: the plan removes the copy (the oldest stays), never the healthy `linux[1]`; after the apply every
/// machine exists exactly once, and the drift check says so.
#[test]
fn a_copy_of_a_machine_is_removed_and_every_name_exists_once() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "copy");
    f.write(1, 2, None);
    f.ok(&["apply", "--auto-approve"]);
    let name0 = format!("nimbus.{}.linux.0", f.tenant);
    // EC2 reports launch times to the second: the copy is launched a second later than every machine.
    std::thread::sleep(Duration::from_millis(1100));
    let copy = rt().block_on(async {
        let c = sdk().await;
        let all = c
            .describe_instances()
            .filters(Filter::builder().name("tag:nimbus:machine").values(&name0).build())
            .send()
            .await
            .unwrap();
        let original = all.reservations()[0].instances()[0].clone();
        let tags: Vec<Tag> = original.tags().to_vec();
        let out = c
            .run_instances()
            .image_id("ami-0def")
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Large)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Instance).set_tags(Some(tags)).build(),
            )
            .send()
            .await
            .unwrap();
        out.instances()[0].instance_id().unwrap().to_string()
    });
    let o = f.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(2), "a doubled name is drift\n{}", text(&o));
    let plan = f.plan_json(&[]);
    let changes = plan["resource_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["name"], name0.as_str());
    assert!(changes[0]["address"].as_str().unwrap().ends_with(&copy), "{}", changes[0]);
    assert!(changes[0]["reason"].as_str().unwrap().contains("copy"), "{}", changes[0]);
    assert_eq!(kinds(&plan), ["terminate_instance"], "the copy goes, and nothing else: {plan}");
    f.ok(&["apply", "--auto-approve"]);
    let names = rt().block_on(async {
        let c = sdk().await;
        let (_, instances) = tenant_resources(&c, &f.tenant).await;
        let mut names = Vec::new();
        for id in instances.keys() {
            let d = c.describe_instances().instance_ids(id).send().await.unwrap();
            let i = &d.reservations()[0].instances()[0];
            names.push(
                i.tags().iter().find(|t| t.key() == Some("nimbus:machine")).unwrap().value().unwrap().to_string(),
            );
        }
        assert!(!instances.contains_key(&copy), "the copy was terminated: {instances:?}");
        names.sort();
        names
    });
    let t = &f.tenant;
    assert_eq!(names, [format!("nimbus.{t}.linux.0"), format!("nimbus.{t}.linux.1"), format!("nimbus.{t}.mac.0")]);
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

/// Issue 18.7: right after a successful apply, where EC2's listings do not show yet what it made (the peer's slow
/// read-lag region), the plan says those machines were made by that run and are not visible yet, waits for them
/// instead of counting them as to add, and the drift check does not call them drift; an immediate re-apply makes
/// nothing. Once they show, the plan is empty.
#[test]
fn right_after_an_apply_the_plan_waits_for_what_it_made() {
    let Some(url) = moto() else { return };
    let region = std::env::var("NIMBUS_MOTO_SLOW_LAG_REGION").expect("scripts/peers.sh sets it");
    let lag: u64 = std::env::var("NIMBUS_MOTO_SLOW_LAG_SECONDS").expect("scripts/peers.sh sets it").parse().unwrap();
    let f = Fleet::new(&url, "unseen");
    std::fs::write(f.dir.path().join("fleet.yaml"), fleet(&f.tenant, 0, 2, None).replace("us-east-1", &region))
        .unwrap();
    let o = f.ok(&["apply", "--auto-approve"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Resources: 2 added"), "{}", text(&o));
    let made = std::time::Instant::now();
    let o = f.run(&["plan", "--detailed-exitcode"]);
    assert!(made.elapsed() < Duration::from_secs(lag), "the peer's lag must outlast the plan");
    assert_eq!(o.status.code(), Some(0), "not drift while not visible yet\n{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("made by run 1") && out.contains("not visible yet"), "{out}");
    assert!(out.contains("Plan: 0 to add"), "{out}");
    let o = f.ok(&["apply", "--auto-approve"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("added"), "nothing is made again: {}", text(&o));
    assert!(made.elapsed() < Duration::from_secs(lag), "the peer's lag must outlast the re-apply");
    let instances = rt().block_on(async {
        let c = sdk_in(&region).await;
        let mut n = 0;
        for r in c.describe_instances().send().await.unwrap().reservations() {
            n += r.instances().iter().filter(|i| i.tags().iter().any(|t| t.value() == Some(f.tenant.as_str()))).count();
        }
        n
    });
    assert!(instances <= 2, "{instances}");
    // Once they show, the fleet is converged: exactly two.
    std::thread::sleep(Duration::from_secs(lag).saturating_sub(made.elapsed()) + Duration::from_millis(500));
    let o = f.run(&["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("No changes."), "{}", text(&o));
    let (_, instances) = rt().block_on(async { tenant_resources(&sdk_in(&region).await, &f.tenant).await });
    assert_eq!(instances.len(), 2, "{instances:?}");
}

/// Issue 19.4: every request the AWS SDK sends is a `nimbus.cloud_provider.api_call_*` event with its
/// operation's name, the machine it is for, tenant_id and duration, and is counted for the metrics.
#[test]
fn every_aws_request_is_an_api_call_event() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "apicalls");
    f.write(0, 1, None);
    let o = f.ok(&["--log-format", "json", "apply", "--auto-approve"]);
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stderr).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let named = |n: &str| events.iter().filter(|e| e["fields"]["event"] == n).collect::<Vec<_>>();
    let machine = format!("nimbus.{}.linux.0", f.tenant);
    let run = named("nimbus.cloud_provider.api_call_success")
        .into_iter()
        .find(|e| e["fields"]["operation"] == "RunInstances")
        .cloned()
        .unwrap_or_else(|| panic!("no RunInstances event:\n{}", text(&o)));
    assert_eq!(run["fields"]["machine_id"], machine.as_str(), "{run}");
    assert_eq!(run["fields"]["tenant_id"], f.tenant.as_str(), "{run}");
    assert_eq!(run["fields"]["provider"], "aws", "{run}");
    assert!(run["fields"]["duration"].is_u64(), "{run}");
    let starts = named("nimbus.cloud_provider.api_call_start");
    assert!(
        starts
            .iter()
            .any(|e| e["fields"]["operation"] == "RunInstances" && e["fields"]["machine_id"] == machine.as_str())
    );
    assert!(
        named("nimbus.cloud_provider.api_call_success").iter().any(|e| e["fields"]["operation"] == "DescribeInstances"),
        "discovery's requests are reported"
    );
    // Each start has its end.
    let ends =
        named("nimbus.cloud_provider.api_call_success").len() + named("nimbus.cloud_provider.api_call_failure").len();
    assert_eq!(starts.len(), ends);
}

/// Issue 19.3: a throttled request (EC2 answers `RequestLimitExceeded` with HTTP 503) is a failure event and is
/// counted as throttled for the provider, each retry on its own. The peer is a loopback server that throttles.
#[test]
fn throttled_aws_requests_are_counted() {
    use std::io::{Read, Write};
    // Only for the SDK's credentials and region (set once for every AWS test); requests go to the server below.
    let Some(_) = moto() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            let body = "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>x</RequestID></Response>";
            let _ = s.write_all(
                format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                    .as_bytes(),
            );
        }
    });
    let name = unique_tenant("throttled");
    let throttled = || {
        nimbus::util::telemetry::api_requests()
            .into_iter()
            .filter(|((k, n, o), _)| k == "provider" && *n == name && o.as_str() == "throttled")
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    rt().block_on(async {
        let p = AwsProvider::new(
            &name,
            "t",
            AwsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(endpoint.clone()),
                max_attempts: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let e = p.discover("t").await.unwrap_err();
        assert!(e.to_string().contains("RequestLimitExceeded"), "{e}");
    });
    // Discovery's first request is tried twice (max_attempts: 2), each a throttled request of its own.
    assert!(throttled() >= 2, "every attempt was counted as throttled: {}", throttled());
}

/// Issue 20 on moto: the plan says what it commits (terminal and JSON), a budget defers the host past
/// `max_hosts`, and `nimbus hosts` lists the ledger with what the host has cost.
#[test]
fn the_ledger_costs_and_budgets_on_moto() {
    let Some(url) = moto() else { return };
    let f = Fleet::new(&url, "ledger");
    let write = |extra: &str| {
        std::fs::write(f.dir.path().join("fleet.yaml"), fleet(&f.tenant, 2, 1, None) + extra).unwrap();
    };
    write("budget:\n  max_hosts: {mac2.metal: 1}\n");
    let plan = f.plan_json(&[]);
    assert_eq!(plan["format_version"], "1.7");
    assert_eq!(kinds(&plan).iter().filter(|k| *k == "allocate_host").count(), 1, "the budget allows one host");
    let deferred = plan["deferred"].as_array().unwrap();
    assert!(
        deferred.iter().any(|d| d["kind"] == "budget" && d["reason"].as_str().unwrap().contains("budget.max_hosts")),
        "{deferred:?}"
    );
    let cost = &plan["cost"];
    assert_eq!(cost["currency"], "USD");
    // One host's 24 hours plus the Linux instance's minute.
    assert!((cost["committed_hours"].as_f64().unwrap() - (24.0 + 1.0 / 60.0)).abs() < 1e-6, "{cost}");
    assert!((cost["committed"].as_f64().unwrap() - (24.0 * 0.65 + 0.0832 / 60.0)).abs() < 1e-6, "{cost}");
    let o = f.ok(&["plan"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Cost: this plan commits $15.60 (24.0 host-hours)"), "{out}");
    assert!(out.contains("when the budget allows"), "{out}");
    // The budget's deferral is drift: a drift check says so.
    assert_eq!(f.run(&["plan", "--detailed-exitcode"]).status.code(), Some(2));
    f.ok(&["apply", "--auto-approve"]);
    let o = f.ok(&["hosts", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{v}");
    assert_eq!(hosts[0]["state"], "in_use");
    assert_eq!(hosts[0]["hours_billed"], 24.0);
    assert!((hosts[0]["cost_so_far"].as_f64().unwrap() - 15.6).abs() < 1e-9);
    assert_eq!(hosts[0]["machine"], format!("nimbus.{}.mac.0", f.tenant));
    assert_eq!(hosts[0]["release_policy"], "asap");
    let o = f.ok(&["hosts"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("in_use") && out.contains("$15.60"), "{out}");
    // The budget raised: the second host is allocated.
    write("budget:\n  max_hosts: {mac2.metal: 2}\n");
    let plan = f.plan_json(&[]);
    assert_eq!(kinds(&plan).iter().filter(|k| *k == "allocate_host").count(), 1);
    assert!(plan["deferred"].as_array().unwrap().iter().all(|d| d["kind"] != "budget"));
}

/// Issue 24.3: the user's tags go on the instance, its volumes and its dedicated host at creation, and a change
/// is CreateTags for the keys set and DeleteTags for the keys removed, on those resources only, never touching
/// nimbus's own tags; another tenant's instance is never retagged.
#[test]
fn user_tags_go_on_instance_volumes_and_host_and_change_in_place() {
    use nimbus::providers::MachineRef;
    let Some(url) = moto() else { return };
    let proxy = crate::conformance::ec2_proxy::Ec2Proxy::start(&url);
    let tenant = unique_tenant("tags");
    let machine = format!("nimbus.{tenant}.mac.0");
    let user: nimbus::core::model::UserTags =
        [("team".to_string(), "mobile".to_string()), ("cost-center".to_string(), "cc-1".to_string())].into();
    rt().block_on(async {
        let settings = || AwsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some(proxy.url.clone()),
            ..Default::default()
        };
        let p = AwsProvider::new("aws", &tenant, settings()).await.unwrap();
        let (host, id) = mac_on_its_own_host(&p, &tenant, &machine, "ami-0abc", user.clone()).await;
        let c = sdk().await;
        let tags_of = |ts: &[Tag]| -> BTreeMap<String, String> {
            ts.iter()
                .map(|t| (t.key().unwrap_or_default().to_string(), t.value().unwrap_or_default().to_string()))
                .collect()
        };
        let all = || async {
            let i =
                c.describe_instances().instance_ids(&id).send().await.unwrap().reservations()[0].instances()[0].clone();
            let vols: Vec<String> = i
                .block_device_mappings()
                .iter()
                .filter_map(|b| b.ebs().and_then(|e| e.volume_id()).map(str::to_string))
                .collect();
            assert!(!vols.is_empty(), "the instance has a volume");
            let v = c.describe_volumes().set_volume_ids(Some(vols)).send().await.unwrap();
            let h = c.describe_hosts().host_ids(&host).send().await.unwrap();
            let mut out = vec![("instance", tags_of(i.tags()))];
            out.extend(v.volumes().iter().map(|v| ("volume", tags_of(v.tags()))));
            out.push(("host", tags_of(h.hosts()[0].tags())));
            out
        };
        for (what, t) in all().await {
            assert_eq!(t.get("team").map(String::as_str), Some("mobile"), "{what}: {t:?}");
            assert_eq!(t.get("cost-center").map(String::as_str), Some("cc-1"), "{what}: {t:?}");
            assert_eq!(t.get("nimbus:tenant"), Some(&tenant), "{what}: {t:?}");
        }
        let r = MachineRef { name: machine.clone(), instance_id: Some(id.clone()), address: None };
        let set: nimbus::core::model::UserTags = [("team".to_string(), "ios".to_string())].into();
        p.update_tags(&r, Some(&host), &set, &["cost-center".to_string()]).await.unwrap();
        for (what, t) in all().await {
            assert_eq!(t.get("team").map(String::as_str), Some("ios"), "{what}: {t:?}");
            assert!(!t.contains_key("cost-center"), "{what}: {t:?}");
            assert_eq!(t.get("nimbus:machine"), Some(&machine), "{what}: nimbus's own tags stay: {t:?}");
        }
        // Refused: a reserved key, and another tenant's instance.
        let reserved: nimbus::core::model::UserTags = [("nimbus:tenant".to_string(), "x".to_string())].into();
        assert!(p.update_tags(&r, None, &reserved, &[]).await.is_err());
        let other = AwsProvider::new("aws", "someone-else", settings()).await.unwrap();
        let e = other.update_tags(&r, None, &set, &[]).await.unwrap_err().to_string();
        assert!(e.contains("refusing"), "{e}");
    });
    // The requests: CreateTags and DeleteTags carry the user's keys only.
    let st = proxy.state.lock().unwrap();
    let updates: Vec<&String> = st
        .bodies
        .iter()
        .filter(|b| b.contains("Action=DeleteTags") || (b.contains("Action=CreateTags") && b.contains("ios")))
        .collect();
    assert_eq!(updates.len(), 2, "{updates:?}");
    for b in updates {
        assert!(!b.contains("nimbus%3A") && !b.contains("nimbus:"), "nimbus's tags untouched: {b}");
    }
}
