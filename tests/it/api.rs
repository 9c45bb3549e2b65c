//! The library facade (`nimbus::api`): provision, list, get, can-terminate and terminate, per tenant, fed by
//! a `Storage`; and the `examples/embed` program that serves two tenants from memory.

use nimbus::api::{ApiError, FileStorage, MemoryStorage, Nimbus, Storage};

use crate::common::*;

fn local_fleet(tenant: &str) -> nimbus::config::FleetConfig {
    let yaml = format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  local: {{type: local}}\npools:\n  - name: ci\n    provider: local\n    count: 0\n    machine: {{os: linux, arch: x86_64, image: img}}\n    setup:\n      - name: hello\n        run: printf '%s' \"$NIMBUS_MACHINE\" > hello\n"
    );
    nimbus::config::parse(tenant, &yaml).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn two_tenants_from_memory_never_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let storage = MemoryStorage::default();
    // Both tenants share one sandbox folder, as two tenants share one cloud account.
    storage.put(local_fleet("acme"), dir.path()).unwrap();
    storage.put(local_fleet("globex"), dir.path()).unwrap();
    let n = Nimbus::new(storage);
    rt().block_on(async {
        assert_eq!(n.storage().tenants().await.unwrap(), ["acme", "globex"]);
        let a = n.provision("acme", "ci").await.unwrap();
        let a2 = n.provision("acme", "ci").await.unwrap();
        let g = n.provision("globex", "ci").await.unwrap();
        assert_eq!((a.name.as_str(), a2.name.as_str()), ("nimbus.acme.ci.0", "nimbus.acme.ci.1"));
        assert_eq!(g.name, "nimbus.globex.ci.0");
        // Set up by the pool's steps.
        let hello = dir.path().join(".nimbus/local/nimbus.acme.ci.1/root/hello");
        assert_eq!(std::fs::read_to_string(hello).unwrap(), "nimbus.acme.ci.1");
        let names: Vec<String> = n.list_machines("acme").await.unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["nimbus.acme.ci.0", "nimbus.acme.ci.1"]);
        assert!(n.get_machine("acme", "nimbus.globex.ci.0").await.unwrap().is_none(), "another tenant's machine");
        let t = n.can_terminate("acme", &a.name).await.unwrap();
        assert!(t.allowed && t.host_releasable_at.is_none());
        // One tenant cannot terminate another's machine.
        assert!(matches!(n.terminate("acme", &g.name).await, Err(ApiError::UnknownMachine { .. })));
        n.terminate("acme", &a.name).await.unwrap();
        assert_eq!(n.list_machines("acme").await.unwrap().len(), 1);
        assert_eq!(n.list_machines("globex").await.unwrap().len(), 1);
        assert!(matches!(n.provision("acme", "nope").await, Err(ApiError::UnknownPool { .. })));
        assert!(matches!(n.list_machines("initech").await, Err(ApiError::Storage(_))));
    });
}

#[test]
fn a_fleet_file_is_one_storage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    let n = Nimbus::new(FileStorage::new(dir.path().join("fleet.yaml")));
    rt().block_on(async {
        assert_eq!(n.storage().tenants().await.unwrap(), ["quickstart"]);
        let m = n.provision("quickstart", "linux").await.unwrap();
        assert_eq!(m.name, "nimbus.quickstart.linux.0");
    });
    // The CLI sees the same machine: one more to add for a pool of two.
    let o = nimbus_env(dir.path(), &["plan"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Plan: 1 to add, 0 to change, 0 to destroy."), "{}", text(&o));
}

/// A Mac machine's host outlives it for the rest of its 24-hour window; the facade says how long.
#[test]
fn can_terminate_tells_the_hosts_window_on_aws() {
    let Some(url) = peer("NIMBUS_MOTO_URL", "moto (EC2)") else { return };
    use_moto_env(&url);
    let tenant = unique_tenant("api");
    let yaml = format!(
        "version: 1\ntenant: {tenant}\nproviders:\n  aws: {{type: aws, region: us-east-1}}\npools:\n  - name: mac\n    provider: aws\n    count: 0\n    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}\n"
    );
    let storage = MemoryStorage::default();
    let dir = tempfile::tempdir().unwrap();
    storage.put(nimbus::config::parse("t", &yaml).unwrap(), dir.path()).unwrap();
    let n = Nimbus::new(storage);
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
        let m = n.provision(&tenant, "mac").await.unwrap();
        assert!(m.host_id.is_some(), "{m:?}");
        let t = n.can_terminate(&tenant, &m.name).await.unwrap();
        assert!(t.allowed);
        let left = t.host_window_remaining.unwrap();
        assert!(
            left > std::time::Duration::from_secs(23 * 3600) && left <= std::time::Duration::from_secs(24 * 3600 + 300)
        );
        n.terminate(&tenant, &m.name).await.unwrap();
        assert!(n.list_machines(&tenant).await.unwrap().is_empty());
    });
}

/// `examples/embed`: two tenants served from memory on the local provider.
#[test]
fn the_embed_example_serves_two_tenants() {
    let exe = std::env::current_exe().unwrap();
    let example = exe.parent().unwrap().parent().unwrap().join("examples").join("embed");
    assert!(example.exists(), "`cargo test` builds the examples; {} is missing", example.display());
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(example).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for t in ["acme", "globex"] {
        assert!(out.contains(&format!("{t}: provisioned nimbus.{t}.ci.0 (local, running)")), "{out}");
        assert!(out.contains(&format!("{t}: terminated nimbus.{t}.ci.0; 0 machine(s) left")), "{out}");
    }
}
