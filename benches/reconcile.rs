//! Reconcile benchmark (issue 19): one idle iteration of the controller over 1,000 machines on moto (EC2 on
//! loopback) and the fake forge. Reports the EC2 calls, the forge calls and the wall time. The pool has no
//! runner (a runner needs `ssh:`, and no test may connect to moto's made-up addresses), so the machines' own
//! state is not read: this measures the cloud and forge side of an iteration.
//! Goal: EC2 calls ≤ ceil(N / 1000) + 4 per iteration.
//!
//! Run with the peers up (`source scripts/peers.sh; peers_start`, which sets NIMBUS_MOTO_URL):
//! `cargo bench --bench reconcile`. Figures are printed, never asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus::engine::reconcile::{Policy, iterate};
use nimbus::forges::Forge;
use nimbus::forges::fake::FakeForge;
use nimbus::providers::Provider;
use nimbus::providers::aws::{AwsProvider, AwsSettings};

const N: usize = 1_000;
const ROUNDS: usize = 5;

fn main() {
    let Ok(moto) = std::env::var("NIMBUS_MOTO_URL") else {
        println!(
            "reconcile benchmark: NIMBUS_MOTO_URL is not set (start the peers: source scripts/peers.sh; peers_start)"
        );
        return;
    };
    for (k, v) in [
        ("AWS_ENDPOINT_URL_EC2", moto.as_str()),
        ("AWS_ENDPOINT_URL", moto.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        // SAFETY: set before any thread or AWS client exists.
        unsafe { std::env::set_var(k, v) };
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _in = rt.enter();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let tenant = format!("benchrec-{:x}", nanos % 0xffff_ffff);
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  aws: {{type: aws, region: us-east-1}}\nforge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {{env: UNUSED_IN_THIS_BENCH}}\n  org: acme\npools:\n  - name: linux\n    provider: aws\n    count: {N}\n    machine: {{os: linux, arch: x86_64, instance_type: t3.large, image: ami-0def, availability_zone: us-east-1a}}\n"
    );
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    let loaded = nimbus::config::load(&dir.path().join("fleet.yaml")).unwrap();
    let forge = Arc::new(FakeForge::new("file:///unused"));
    // A converged fleet: N instances tagged as nimbus tags them, N idle runners.
    let made = Instant::now();
    rt.block_on(async {
        let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
        let c = aws_sdk_ec2::Client::new(&cfg);
        let mut pending = Vec::new();
        for i in 0..N {
            let name = nimbus::core::names::machine_name(&tenant, "linux", i as u32);
            let tags: Vec<aws_sdk_ec2::types::Tag> =
                nimbus::core::names::machine_tags(&tenant, "aws", "linux", &name, Some(&loaded.fleet_id()))
                    .into_iter()
                    .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
                    .collect();
            let c = c.clone();
            pending.push(tokio::spawn(async move {
                c.run_instances()
                    .image_id("ami-0def")
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Large)
                    .placement(aws_sdk_ec2::types::Placement::builder().availability_zone("us-east-1a").build())
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(
                        aws_sdk_ec2::types::TagSpecification::builder()
                            .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                            .set_tags(Some(tags))
                            .build(),
                    )
                    .send()
                    .await
                    .unwrap()
            }));
            if pending.len() >= 16 {
                for p in pending.drain(..) {
                    p.await.unwrap();
                }
            }
        }
        for p in pending {
            p.await.unwrap();
        }
    });
    println!("reconcile benchmark: {N} machines made in moto in {:.1} s", made.elapsed().as_secs_f64());
    let mut walls = Vec::new();
    for round in 0..ROUNDS {
        let provider = rt
            .block_on(AwsProvider::new(
                "aws",
                &tenant,
                AwsSettings { region: Some("us-east-1".into()), ..Default::default() },
            ))
            .unwrap()
            .with_fleet(nimbus::engine::clients::fleet_scope(&loaded));
        let provider = Arc::new(provider);
        let calls_before = forge.calls().len();
        let stop = Arc::new(tokio::sync::watch::channel(false).0);
        let t = Instant::now();
        let it = rt
            .block_on(iterate(
                &loaded,
                None,
                &[provider.clone() as Arc<dyn Provider>],
                Some(forge.clone() as Arc<dyn Forge>),
                &Policy::default(),
                stop,
                Duration::from_secs(60),
            ))
            .unwrap();
        let wall = t.elapsed();
        walls.push(wall);
        let by_call = provider.calls();
        let ec2: u64 = by_call.values().sum();
        let forge_calls = forge.calls().len() - calls_before;
        // The cloud's part of it: one discovery alone.
        let d = Instant::now();
        rt.block_on(provider.discover(&tenant)).unwrap();
        let discover = d.elapsed();
        println!(
            "round {round}: {:.0} ms wall (discovery alone {:.0} ms); EC2 calls {ec2} ({:?}; goal ≤ {}); forge calls {forge_calls}; applied {}",
            wall.as_secs_f64() * 1000.0,
            discover.as_secs_f64() * 1000.0,
            by_call,
            N.div_ceil(1000) + 4,
            it.run.is_some(),
        );
    }
    walls.sort();
    println!(
        "reconcile benchmark: idle iteration over {N} machines, median {:.0} ms",
        walls[walls.len() / 2].as_secs_f64() * 1000.0
    );
}
