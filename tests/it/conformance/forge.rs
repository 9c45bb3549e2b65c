//! The forge conformance suite: GitHub against Prism (GitHub's own OpenAPI description validates every
//! request), and the fake forge the scenario tests use (which must behave the same way where it counts).

use nimbus::config::{Arch, Os};
use nimbus::forges::{AgentTarget, Forge, ForgeError};

use crate::common::*;

/// What the suite knows of the peer behind a forge.
pub struct ForgePeer<'a> {
    pub forge: &'a dyn Forge,
    /// The peer keeps state (the fake): registered runners show up in the list, and deletes take effect.
    pub stateful: bool,
    /// A runner of another tenant and one not made by nimbus exist on the peer.
    pub foreign_runner_names: Vec<String>,
    /// Answers the next `n` requests with the forge's throttling error (a stateful peer that can).
    pub throttle: Option<&'a (dyn Fn(u32) + Sync)>,
    /// The peer pages its lists (so a long list takes several requests).
    pub pages: bool,
    /// The forge changes labels through its API.
    pub relabels: bool,
}

/// Only runners named for the tenant are listed.
pub async fn lists_only_the_tenants_runners(p: &ForgePeer<'_>, tenant: &str) {
    let runners = p.forge.list_runners(tenant).await.expect("list");
    for r in &runners {
        assert!(r.name.starts_with(&format!("nimbus.{tenant}.")), "{} is not {tenant}'s", r.name);
    }
    for n in &p.foreign_runner_names {
        assert!(!runners.iter().any(|r| &r.name == n), "{n} was listed");
    }
}

/// Registering gives what the agent needs, with the secret kept secret: never in the install script (it goes
/// on stdin), never in `Debug`.
pub async fn registration_keeps_its_secret(p: &ForgePeer<'_>, tenant: &str) {
    for ephemeral in [false, true] {
        let name = nimbus::core::model::machine_name(tenant, "p", u32::from(ephemeral));
        let labels = vec!["conform".to_string()];
        let reg = p.forge.register(&name, &labels, ephemeral).await.expect("register");
        assert_eq!(reg.ephemeral, ephemeral);
        assert!(!reg.secret.expose().is_empty());
        assert!(!format!("{reg:?}").contains(reg.secret.expose()), "the secret shows in Debug");
        if ephemeral {
            assert!(reg.runner_id.is_some(), "an ephemeral runner is known to the forge at once");
        }
        let target = AgentTarget { machine: &name, labels: &labels, os: Os::Macos, arch: Arch::Arm64, dir: None };
        let install = p.forge.agent().install(&target, &reg);
        assert!(!install.script.contains(reg.secret.expose()), "the secret is on the command line");
        assert!(String::from_utf8_lossy(&install.stdin).contains(reg.secret.expose()), "the secret is not on stdin");
        if p.stateful && ephemeral {
            let listed = p.forge.list_runners(tenant).await.unwrap();
            assert!(listed.iter().any(|r| r.name == name), "the JIT runner is not listed");
        }
    }
}

/// Deleting a runner that is gone succeeds (a rerun of a teardown is safe); labels are replaced, or (a forge
/// whose runners declare their own labels) the change is refused with why, and the planner registers again.
pub async fn delete_of_missing_is_success(p: &ForgePeer<'_>) {
    p.forge.delete_runner(987_654_321).await.expect("deleting a missing runner");
    match p.forge.set_labels(42, &["a".into(), "b".into()]).await {
        Ok(()) => {}
        // A stateful peer knows runner 42 does not exist.
        Err(ForgeError::NotFound(_)) if p.stateful => {}
        Err(ForgeError::Conflict(m)) if !p.relabels => assert!(m.contains("labels"), "{m}"),
        Err(e) => panic!("{e}"),
    }
}

/// Every page of the runner list is read (a peer that pages and creates runners on registration: 120 runners,
/// more than one page).
pub async fn lists_every_page(p: &ForgePeer<'_>, tenant: &str) {
    if !p.pages {
        return;
    }
    let mut ids = Vec::new();
    for i in 0..120 {
        let name = nimbus::core::model::machine_name(tenant, "many", i);
        ids.push(p.forge.register(&name, &["conform".into()], false).await.unwrap().runner_id);
    }
    let listed = p.forge.list_runners(tenant).await.unwrap();
    assert_eq!(listed.iter().filter(|r| r.name.contains(".many.")).count(), 120, "runners on later pages were missed");
    for id in ids.into_iter().flatten() {
        p.forge.delete_runner(id).await.unwrap();
    }
}

/// A throttled answer is waited out and retried; throttling that outlasts the retries is `Throttled`.
pub async fn throttling_is_retried_and_classified(p: &ForgePeer<'_>, tenant: &str) {
    let Some(throttle) = p.throttle else { return };
    throttle(1);
    p.forge.list_runners(tenant).await.expect("one throttled answer is retried");
    throttle(50);
    let e = p.forge.list_runners(tenant).await.unwrap_err();
    throttle(0);
    assert!(matches!(e, ForgeError::Throttled(_)), "{e:?}");
}

pub async fn run_all(p: &ForgePeer<'_>, tenant: &str) {
    lists_only_the_tenants_runners(p, tenant).await;
    registration_keeps_its_secret(p, tenant).await;
    delete_of_missing_is_success(p).await;
    lists_every_page(p, tenant).await;
    throttling_is_retried_and_classified(p, tenant).await;
}

#[test]
fn github_forge_conforms_against_prism() {
    let Some(url) = peer("NIMBUS_PRISM_URL", "Prism (GitHub API)") else { return };
    let pem = std::fs::read_to_string(std::env::var("NIMBUS_TEST_APP_KEY").expect("NIMBUS_TEST_APP_KEY")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _in_runtime = rt.enter();
    let forge =
        nimbus::forges::github::GitHubForge::new(Some(&url), 12345, 67890, &pem, "acme", Some(7), None).unwrap();
    // The spec's example runners are not named for any tenant.
    let p = ForgePeer {
        forge: &forge,
        stateful: false,
        foreign_runner_names: vec![],
        throttle: None,
        pages: false,
        relabels: true,
    };
    rt.block_on(run_all(&p, "acme"));
}

#[test]
fn the_fake_forge_conforms() {
    let fake = nimbus::forges::fake::FakeForge::new("file:///x");
    fake.add_runner("nimbus.other.p.0", &[]);
    fake.add_runner("hand-made", &[]);
    let p = ForgePeer {
        forge: &fake,
        stateful: true,
        foreign_runner_names: vec!["nimbus.other.p.0".into(), "hand-made".into()],
        throttle: None,
        pages: false,
        relabels: true,
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run_all(&p, "t"));
}

fn gitlab_config(url: &str) -> nimbus::forges::gitlab::config::GitlabConfig {
    nimbus::forges::gitlab::config::GitlabConfig {
        url: url.into(),
        token: nimbus::config::SecretRef::Env("UNUSED".into()),
        runner_type: nimbus::forges::gitlab::config::GitlabRunnerType::Group,
        group_id: Some(7),
        project_id: None,
        projects: vec![11],
        runner_version: None,
        runner_download_url: None,
        runner_sha256: Default::default(),
        runner_dir: None,
        executor: None,
    }
}

/// Issue 22.1: the GitLab forge against the stateful fake (pages, throttling, foreign runners).
#[test]
fn gitlab_forge_conforms() {
    let fake = super::gitlab_fake::GitlabFake::start();
    fake.add_runner("nimbus.other.p.0");
    fake.add_runner("hand-made");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let forge = nimbus::forges::gitlab::GitlabForge::new(
        gitlab_config(&fake.url),
        nimbus::forges::Secret::new(super::gitlab_fake::TOKEN),
    )
    .unwrap();
    let throttle = |n: u32| fake.throttle(n);
    let p = ForgePeer {
        forge: &forge,
        stateful: true,
        foreign_runner_names: vec!["nimbus.other.p.0".into(), "hand-made".into()],
        throttle: Some(&throttle),
        pages: true,
        relabels: true,
    };
    rt.block_on(run_all(&p, "t"));
    assert!(fake.requests("GET /groups/:id/runners") >= 2, "the list was paged");
}

pub fn forgejo_config(url: &str, gitea: bool) -> nimbus::forges::forgejo::config::ForgejoConfig {
    use nimbus::forges::forgejo::config::{Flavour, ForgejoConfig, ForgejoScope};
    ForgejoConfig {
        url: url.into(),
        token: nimbus::config::SecretRef::Env("UNUSED".into()),
        flavour: if gitea { Flavour::Gitea } else { Flavour::Forgejo },
        scope: ForgejoScope::Org("acme".into()),
        runner_version: None,
        runner_download_url: None,
        runner_sha256: Default::default(),
        runner_dir: None,
    }
}

/// Issue 22.2: the Forgejo forge against the stateful fake (runners made through the API, pages, throttling).
#[test]
fn forgejo_forge_conforms() {
    let fake = super::forgejo_fake::ForgejoFake::start(false);
    fake.add_runner("nimbus.other.p.0");
    fake.add_runner("hand-made");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let forge = nimbus::forges::forgejo::ForgejoForge::new(
        forgejo_config(&fake.url, false),
        nimbus::forges::Secret::new(super::forgejo_fake::TOKEN),
    )
    .unwrap();
    let throttle = |n: u32| fake.throttle(n);
    let p = ForgePeer {
        forge: &forge,
        stateful: true,
        foreign_runner_names: vec!["nimbus.other.p.0".into(), "hand-made".into()],
        throttle: Some(&throttle),
        pages: true,
        relabels: false,
    };
    rt.block_on(run_all(&p, "t"));
    assert!(fake.requests("GET /api/v1/orgs/acme/actions/runners") >= 3, "the list was paged");
}
