//! nimbus embedded in an application: two tenants served from an in-memory `Storage` on the local provider.
//!
//!     cargo run --example embed -- [DATA_DIR]
//!
//! Each tenant gets a machine provisioned (set up by its pool's steps), listed, checked, and terminated.
//! Sandboxes live under DATA_DIR (default: a new temporary folder). No cloud account is needed.

use std::path::PathBuf;

use nimbus::api::{MemoryStorage, Nimbus, Storage, Termination};

/// What an application would keep in its database for a tenant, here as fleet-file YAML.
fn tenant_fleet(tenant: &str) -> String {
    format!(
        "version: 1
tenant: {tenant}
providers:
  local:
    type: local
pools:
  - name: ci
    provider: local
    count: 0
    machine: {{os: linux, arch: x86_64, image: ubuntu-24.04}}
    setup:
      - name: hello
        run: echo \"hello from $NIMBUS_MACHINE\" > hello
"
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data: PathBuf = match std::env::args().nth(1) {
        Some(d) => d.into(),
        None => std::env::temp_dir().join(format!("nimbus-embed-{}", std::process::id())),
    };
    let storage = MemoryStorage::default();
    for tenant in ["acme", "globex"] {
        let config = nimbus::config::parse(tenant, &tenant_fleet(tenant))?;
        // Each tenant's relative paths (its sandboxes) resolve under its own folder.
        storage.put(config, &data.join(tenant))?;
    }
    let nimbus = Nimbus::new(storage);
    for tenant in nimbus.storage().tenants().await? {
        let m = nimbus.provision(&tenant, "ci").await?;
        println!("{tenant}: provisioned {} ({}, {})", m.name, m.provider, m.state);
        let all = nimbus.list_machines(&tenant).await?;
        println!(
            "{tenant}: {} machine(s): {}",
            all.len(),
            all.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        let t = nimbus.can_terminate(&tenant, &m.name).await?;
        println!("{tenant}: can terminate {}: {}", m.name, t.instance_can_go());
        if let Termination::Busy { .. } = t {
            continue; // a job runs: nothing goes (jobs are sacred)
        }
        nimbus.terminate(&tenant, &m.name).await?;
        println!("{tenant}: terminated {}; {} machine(s) left", m.name, nimbus.list_machines(&tenant).await?.len());
    }
    Ok(())
}
