//! The library facade (`nimbus::api`): provision, list, get, can-terminate and terminate, per tenant, fed by
//! a `Storage`; and the `examples/embed` program that serves two tenants from memory.

use nimbus::api::{ApiError, FileStorage, MemoryStorage, Nimbus, Storage, Termination};

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
        assert_eq!(t, Termination::Allowed);
        assert!(t.instance_can_go() && t.host_can_go());
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
        // The pool wants 2; one more makes 3, and the fleet is applied as `nimbus apply` would.
        let m = n.provision("quickstart", "linux").await.unwrap();
        assert_eq!(m.name, "nimbus.quickstart.linux.2");
    });
    let fleet = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap();
    assert!(fleet.contains("count: 3") && fleet.contains("# nimbus quickstart"), "count changed in place: {fleet}");
    // Issue 18.4: the CLI agrees: nothing to do after `provision` ...
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    rt().block_on(async {
        n.terminate("quickstart", "nimbus.quickstart.linux.1").await.unwrap();
        let names: Vec<String> = n.list_machines("quickstart").await.unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["nimbus.quickstart.linux.0", "nimbus.quickstart.linux.2"], "the named machine went");
    });
    // ... nor after `terminate` (the machine is not made again).
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("No changes."), "{}", text(&o));
    // Both calls are runs in the journal, by actor `api`.
    let j = nimbus::state::journal::Journal::open(&dir.path().join(".nimbus/journal.db")).unwrap();
    let runs = j.runs(10).unwrap();
    let api: Vec<(&str, Option<&str>)> = runs
        .iter()
        .filter(|r| r.actor.as_deref() == Some("api"))
        .map(|r| (r.command.as_str(), r.actor.as_deref()))
        .collect();
    assert!(api.contains(&("provision", Some("api"))) && api.contains(&("terminate", Some("api"))), "{runs:?}");
}

/// Issue 18.4: the facade takes the fleet's lock: it never runs beside an apply of the same fleet.
#[test]
fn the_facade_waits_for_no_one_and_races_no_apply() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    let n = Nimbus::new(FileStorage::new(dir.path().join("fleet.yaml")));
    let held = nimbus::state::journal::ApplyLock::acquire(&dir.path().join(".nimbus/apply.lock")).unwrap();
    let r = rt().block_on(n.provision("quickstart", "linux"));
    let Err(ApiError::Session(e)) = r else { panic!("an apply holds the lock: {r:?}") };
    assert!(e.to_string().contains("another apply of this fleet is running"), "{e}");
    let fleet = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap();
    assert!(fleet.contains("count: 2"), "nothing changed while locked: {fleet}");
    drop(held);
    assert!(
        !dir.path().join(".nimbus/local").exists()
            || std::fs::read_dir(dir.path().join(".nimbus/local")).unwrap().next().is_none()
    );
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
        // The instance can go now; the host cannot: the type says which.
        let Termination::MinimumAllocationPeriod { host_id, remaining, releasable_at } = &t else {
            panic!("inside the 24-hour minimum allocation period: {t:?}")
        };
        assert_eq!(Some(host_id), m.host_id.as_ref());
        assert!(t.instance_can_go() && !t.host_can_go());
        assert!(
            *remaining > std::time::Duration::from_secs(23 * 3600)
                && *remaining <= std::time::Duration::from_secs(24 * 3600 + 300)
        );
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["reason"], "minimum_allocation_period", "{json}");
        assert_eq!(json["remaining"], remaining.as_secs(), "{json}");
        n.terminate(&tenant, &m.name).await.unwrap();
        assert!(n.list_machines(&tenant).await.unwrap().is_empty());
        // Its host stays, held until its window ends (the same rule as `apply`), and says when it goes.
        let hosts = n.list_hosts(&tenant).await.unwrap();
        let h = hosts.iter().find(|h| &h.id == host_id).expect("the host is still allocated");
        assert!(h.state == "held" || h.state == "scrubbing", "{h:?}");
        assert_eq!(&h.releasable_at, releasable_at);
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
