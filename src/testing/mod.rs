//! A simulated world for tests and benchmarks: builds fleets and applies a
//! plan's actions to an [`Actual`] the way a faithful provider and forge
//! would. Strict: an action that a real provider would refuse panics.

use chrono::{DateTime, Utc};

use crate::config::{Arch, Os, RunnerMode};
use crate::core::model::*;

/// A pool with sensible defaults for tests.
pub fn pool(name: &str, provider: &str, count: u32, instance_type: &str, image: &str) -> DesiredPool {
    let mac = crate::providers::aws::config::is_mac_metal(instance_type);
    DesiredPool {
        allocate_on_replace: false,
        name: name.into(),
        provider: provider.into(),
        count,
        scale: None,
        spec: MachineSpec {
            os: if mac { Os::Macos } else { Os::Linux },
            arch: Arch::Arm64,
            instance_type: Some(instance_type.into()),
            image: image.into(),
            availability_zone: Some("us-east-1a".into()),
            fallback_zones: vec![],
            tags: Default::default(),
        },
        runner: Some(RunnerSpec::new(vec!["ci".into()], RunnerMode::Persistent)),
        setup: vec![step("base", "echo base")],
        host_release: None,
    }
}

pub fn step(name: &str, run: &str) -> StepSpec {
    StepSpec { name: name.into(), hash: step_hash(run), run: run.into(), timeout: DEFAULT_STEP_TIMEOUT }
}

/// A desired fleet on one `aws` provider (24 h window for mac types) with a forge.
pub fn desired(tenant: &str, pools: Vec<DesiredPool>) -> Desired {
    Desired {
        tenant: tenant.into(),
        providers: [("aws".to_string(), aws_provider())].into(),
        forge: true,
        pools,
        interrupt_jobs: false,
        remove_first: Default::default(),
        budget: Default::default(),
        forge_cannot_relabel: false,
    }
}

/// An `aws` provider as the planner sees it, with AWS's default capabilities (24 h Mac host window).
pub fn aws_provider() -> ProviderInfo {
    ProviderInfo {
        kind: "aws".into(),
        capabilities: crate::providers::aws::config::AwsConfig::default().capabilities(),
        prices: crate::core::cost::prices_for(Some("us-east-1"), &Default::default()),
        host_release: None,
    }
}

pub use crate::sim::world::Simulator;

/// The ephemeral runners of `machines` run their one job and are gone from the forge (GitHub deletes a JIT
/// runner after its job); the machines keep what the job left.
pub fn complete_ephemeral_jobs(world: &mut Actual, machines: &[&str]) {
    if let Some(rs) = world.runners.as_mut() {
        rs.retain(|r| !machines.contains(&r.name.as_str()));
    }
}

/// Every scrub ends at `at`: the hosts report available again (and settle after the provider's delay).
pub fn finish_scrubs(world: &mut Actual, at: DateTime<Utc>) {
    for h in &mut world.hosts {
        if h.state == HostState::Pending {
            h.state = HostState::Available;
            h.available_since = Some(at);
        }
    }
}

/// Every running job finishes: busy runners become idle.
pub fn finish_jobs(world: &mut Actual) {
    for r in world.runners.iter_mut().flatten() {
        r.busy = false;
    }
}

/// Runners of `machines` pick up a job.
pub fn start_jobs(world: &mut Actual, machines: &[&str]) {
    for r in world.runners.iter_mut().flatten() {
        if machines.contains(&r.name.as_str()) {
            r.busy = true;
            r.online = true;
        }
    }
}
