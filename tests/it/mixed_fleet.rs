//! Issue 22.6: one fleet file with a GitHub pool on AWS Mac (moto), a GitLab pool on Hetzner (its fake), and a
//! Forgejo pool on the local provider. Plan, apply, converge, scale, drain a busy runner, reconcile once.
//! Each forge's runners register with its own fake (GitHub: the in-process fake forge; GitLab and Forgejo:
//! their loopback fakes and fake agents); AWS and Hetzner machines are reached over the loopback sshd through
//! `proxy_command`.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::conformance::{forgejo_fake, gitlab_fake, hetzner_fake};
use nimbus::forges::Forge;
use nimbus::providers::Provider;

#[test]
fn a_mixed_fleet_plans_applies_converges_scales_drains_and_reconciles() {
    let Some(moto) = peer("NIMBUS_MOTO_URL", "moto (EC2)") else { return };
    let Some(sshd) = peer("NIMBUS_SSHD_URL", "sshd") else { return };
    use_moto_env(&moto);
    let port: u16 = sshd.rsplit(':').next().unwrap().parse().unwrap();
    let user = std::env::var("NIMBUS_SSHD_USER").unwrap();
    let key = std::env::var("NIMBUS_SSHD_KEY").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let tenant = unique_tenant("mixed");

    let gitlab = gitlab_fake::GitlabFake::start();
    let forgejo = forgejo_fake::ForgejoFake::start(false);
    let hetzner = hetzner_fake::HetznerFake::start();
    let (gl_agent, gl_sum) = gitlab_fake::fake_agent(dir.path());
    let (fj_agent, fj_sum) = forgejo_fake::fake_agent(dir.path());
    let (gh_agent, gh_sum) = fake_runner(dir.path());
    std::fs::copy(dir.path().join("runner-linux-x64.tgz"), dir.path().join("runner-osx-arm64.tgz")).unwrap();

    let fleet = |n_mac: u32, n_gl: u32, n_fj: u32| {
        format!(
            r#"version: 1
tenant: {tenant}
providers:
  aws: {{type: aws, region: us-east-1}}
  hetzner: {{type: hetzner, token: {{env: UNUSED_HCLOUD}}, location: fsn1, api_url: "{hz}"}}
  local: {{type: local}}
forges:
  github: {{type: github, app_id: 1, installation_id: 2, private_key: {{env: UNUSED_GH}}, org: acme}}
  gitlab: {{type: gitlab, url: "{gl}", token: {{env: UNUSED_GL}}, runner_type: group, group_id: 7, runner_download_url: "{gl_agent}", runner_sha256: {{linux-amd64: {gl_sum}}}}}
  forgejo: {{type: forgejo, url: "{fj}", token: {{env: UNUSED_FJ}}, scope: {{org: acme}}, runner_download_url: "{fj_agent}", runner_sha256: {{linux-amd64: {fj_sum}}}}}
ssh:
  user: {user}
  key: {{file: {key}}}
  known_hosts: known_hosts
  proxy_command: "nc 127.0.0.1 {port}"
  state_path: "{d}/machines/{{machine}}/state.db"
pools:
  - name: mac
    provider: aws
    forge: github
    count: {n_mac}
    machine: {{os: macos, arch: arm64, instance_type: mac2.metal, image: ami-0abc, availability_zone: us-east-1a}}
    runner: {{labels: [xcode]}}
  - name: lgl
    provider: hetzner
    forge: gitlab
    count: {n_gl}
    machine: {{os: linux, arch: x86_64, instance_type: cx22, image: ubuntu-24.04}}
    runner: {{labels: [build]}}
  - name: lfj
    provider: local
    forge: forgejo
    count: {n_fj}
    machine: {{os: linux, arch: x86_64, image: img}}
    runner: {{labels: [build]}}
"#,
            hz = hetzner.url,
            gl = gitlab.url,
            fj = forgejo.url,
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    // The clients the CLI would build from the file, with the test peers' addresses and the fakes' secrets.
    let ssh = nimbus::transport::ssh::SshConnector::new(nimbus::transport::ssh::SshSettings {
        user: user.clone(),
        port,
        auth: nimbus::transport::ssh::SshAuth::Key(Arc::new(russh::keys::load_secret_key(&key, None).unwrap())),
        known_hosts: dir.path().join("known_hosts"),
        proxy_command: Some(format!("nc 127.0.0.1 {port}")),
        jump: None,
        connect_timeout: Duration::from_secs(5),
        state_path: format!("{d}/machines/{{machine}}/state.db"),
        pin_new_keys: true,
        env_passthrough: Vec::new(),
    });
    let aws: Arc<dyn Provider> = Arc::new(
        rt.block_on(nimbus::providers::aws::AwsProvider::new(
            "aws",
            &tenant,
            nimbus::providers::aws::AwsSettings { region: Some("us-east-1".into()), ..Default::default() },
        ))
        .unwrap()
        .with_transport(nimbus::providers::aws::reach::over_ssh(ssh.clone())),
    );
    let mut hs = nimbus::providers::hetzner::HetznerSettings::new(hetzner.url.clone(), "test-token");
    hs.location = Some("fsn1".into());
    hs.poll = Duration::from_millis(20);
    let hz: Arc<dyn Provider> = Arc::new(
        nimbus::providers::hetzner::HetznerProvider::new("hetzner", &tenant, hs)
            .unwrap()
            .with_transport(nimbus::providers::aws::reach::over_ssh(ssh.clone())),
    );
    let local: Arc<dyn Provider> =
        Arc::new(nimbus::providers::local::LocalProvider::new("local", &tenant, dir.path().join("sandboxes")));
    let providers = vec![aws, hz, local];
    let github = Arc::new(nimbus::forges::fake::FakeForge::new(gh_agent).with_sha256("osx-arm64", &gh_sum));
    let config = |yaml: &str| nimbus::config::parse("fleet.yaml", yaml).unwrap();
    let forge_cfg = |c: &nimbus::config::FleetConfig, name: &str| c.forges.as_ref().unwrap()[name].clone();
    let c0 = config(&fleet(1, 1, 1));
    let gl_forge = match forge_cfg(&c0, "gitlab") {
        nimbus::config::ForgeConfig::Gitlab(g) => {
            nimbus::forges::gitlab::GitlabForge::new(g, nimbus::forges::Secret::new(gitlab_fake::TOKEN)).unwrap()
        }
        _ => unreachable!(),
    };
    let fj_forge = match forge_cfg(&c0, "forgejo") {
        nimbus::config::ForgeConfig::Forgejo(f) => {
            nimbus::forges::forgejo::ForgejoForge::new(f, nimbus::forges::Secret::new(forgejo_fake::TOKEN)).unwrap()
        }
        _ => unreachable!(),
    };
    let runners = |m: &str| Some(format!("{d}/runners/{{machine}}/{m}"));
    let forge: Arc<dyn Forge> = Arc::new(
        nimbus::forges::multi::MultiForge::new(vec![
            ("github".into(), github.clone() as Arc<dyn Forge>, runners("gh"), vec!["mac".into()]),
            ("gitlab".into(), Arc::new(gl_forge) as Arc<dyn Forge>, runners("gl"), vec!["lgl".into()]),
            ("forgejo".into(), Arc::new(fj_forge) as Arc<dyn Forge>, runners("fj"), vec!["lfj".into()]),
        ])
        .unwrap(),
    );
    let actual = || {
        rt.block_on(nimbus::engine::discovery::discover_with_forge(&tenant, &providers, Some(forge.as_ref()))).unwrap()
    };
    let apply = |yaml: &str| {
        let desired = nimbus::core::model::Desired::from_config(&config(yaml));
        let a = actual();
        let p = nimbus::core::plan::plan(&desired, &a, chrono::Utc::now());
        let applier =
            nimbus::engine::actions::Applier::new(desired, &a, providers.clone(), Some(dir.path().join("logs")))
                .with_forge(forge.clone(), None);
        let report =
            rt.block_on(nimbus::engine::walk::execute(Arc::new(p.graph.clone()), Arc::new(applier), 10, |_| {}));
        assert!(report.succeeded(), "{:?}", report.outcomes);
        // The machine side of the GitHub fake: a configured runner shows up on the forge.
        runner_comes_online(&github, &dir.path().join(format!("runners/nimbus.{tenant}.mac.0/gh")));
        p
    };
    let plan_of = |yaml: &str| {
        nimbus::core::plan::plan(
            &nimbus::core::model::Desired::from_config(&config(yaml)),
            &actual(),
            chrono::Utc::now(),
        )
    };
    let kinds = |p: &nimbus::core::plan::Plan| p.actions().map(|(_, a)| a.kind.name()).collect::<Vec<_>>();

    // Plan and apply: three machines on three providers, three runners on three forges.
    let first = plan_of(&fleet(1, 1, 1));
    assert_eq!(first.summary().add, 3, "{:?}", kinds(&first));
    apply(&fleet(1, 1, 1));
    assert_eq!(github.runners().len(), 1);
    assert!(gitlab.runners().iter().all(|r| r.contacted) && gitlab.runners().len() == 1, "{:?}", gitlab.runners());
    let t0 = std::time::Instant::now();
    while !forgejo.runners().iter().any(|r| r.contacted) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the forgejo runner never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Converged.
    let again = plan_of(&fleet(1, 1, 1));
    assert!(kinds(&again).is_empty(), "{:?}", kinds(&again));

    // Scale the Forgejo pool.
    apply(&fleet(1, 1, 2));
    assert_eq!(forgejo.runners().len(), 2);

    // Drain: the GitLab runner on Hetzner takes a job; its pool goes to zero meanwhile: nothing is removed.
    let job = gitlab.queue_job_for(0, &["build"], 8);
    let t0 = std::time::Instant::now();
    while gitlab.job(job).unwrap().status != "running" {
        assert!(t0.elapsed() < Duration::from_secs(30), "the gitlab runner never took the job");
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = plan_of(&fleet(1, 0, 2));
    assert!(kinds(&p).is_empty(), "{:?}", kinds(&p));
    assert!(p.deferred.iter().any(|d| d.kind == nimbus::core::plan::DeferredKind::BusyRunner));

    // Reconcile once, with the same clients: nothing is removed under the job, nothing fails.
    std::fs::write(dir.path().join("fleet.yaml"), fleet(1, 0, 2)).unwrap();
    let loaded = nimbus::config::load(&dir.path().join("fleet.yaml")).unwrap();
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let it = rt
        .block_on(nimbus::engine::reconcile::iterate(
            &loaded,
            None,
            &providers,
            Some(forge.clone()),
            &nimbus::engine::reconcile::Policy::default(),
            stop,
            Duration::from_secs(60),
        ))
        .unwrap();
    assert!(it.errors.is_empty(), "{:?}", it.errors);
    assert!(it.deferred >= 1);
    assert_eq!(gitlab.runners().len(), 1, "the busy runner stays");

    // The job ends: the Hetzner server goes and its runner is deleted; the rest stays.
    while gitlab.job(job).unwrap().status == "running" {
        assert!(t0.elapsed() < Duration::from_secs(60), "the job never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    apply(&fleet(1, 0, 2));
    assert!(gitlab.runners().is_empty(), "{:?}", gitlab.runners());
    assert!(kinds(&plan_of(&fleet(1, 0, 2))).is_empty());
    assert_eq!(github.runners().len(), 1);
    assert_eq!(forgejo.runners().len(), 2);
    let _ = hetzner;
}
