//! Runner registration scenarios with the stateful fake forge and real
//! machines (local sandboxes, the same transport trait as SSH): install and
//! register, converge, labels updated in place, ghost runners and
//! unregistered machines as drift, ephemeral JIT runners, and no token ever
//! in plans, logs or on-machine state.

use std::path::{Path, PathBuf};

use crate::common::*;
use std::sync::Arc;

use nimbus::core::model::{Actual, Desired};
use nimbus::core::plan::document::PlanDocument;
use nimbus::core::plan::plan;
use nimbus::engine::actions::Applier;
use nimbus::engine::walk::execute;
use nimbus::forges::Forge;
use nimbus::forges::fake::FakeForge;
use nimbus::providers::Provider;
use nimbus::providers::local::LocalProvider;

fn fleet(labels: &str, mode: &str) -> String {
    format!(
        "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\nforge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {{env: UNUSED_IN_THIS_TEST}}\n  org: acme\npools:\n  - name: p\n    provider: local\n    count: 2\n    machine: {{os: linux, arch: x86_64, image: img}}\n    runner:\n      labels: [{labels}]\n      mode: {mode}\n    setup:\n      - name: base\n        run: echo base\n"
    )
}

struct World {
    dir: tempfile::TempDir,
    forge: Arc<FakeForge>,
    provider: Arc<dyn Provider>,
    rt: tokio::runtime::Runtime,
    outputs: String,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let (url, sha256) = fake_runner(dir.path());
        let provider: Arc<dyn Provider> = Arc::new(LocalProvider::new("local", "t", dir.path().join("sandboxes")));
        World {
            forge: Arc::new(FakeForge::new(url).with_sha256("linux-x64", &sha256)),
            provider,
            dir,
            rt: tokio::runtime::Runtime::new().unwrap(),
            outputs: String::new(),
        }
    }

    fn desired(&self, labels: &str, mode: &str) -> Desired {
        Desired::from_config(&nimbus::config::parse("fleet.yaml", &fleet(labels, mode)).unwrap())
    }

    fn actual(&self) -> Actual {
        self.rt
            .block_on(nimbus::engine::discovery::discover_with_forge(
                "t",
                std::slice::from_ref(&self.provider),
                Some(self.forge.as_ref() as &dyn Forge),
            ))
            .unwrap()
    }

    fn plan(&mut self, d: &Desired) -> nimbus::core::plan::Plan {
        let p = plan(d, &self.actual(), chrono::Utc::now());
        self.outputs.push_str(&PlanDocument::from_plan(&p, None, None).to_json());
        p
    }

    fn try_apply(&mut self, d: &Desired) -> nimbus::engine::walk::ExecReport {
        let p = self.plan(d);
        let actual = self.actual();
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let applier = Applier::new(d.clone(), &actual, vec![self.provider.clone()], Some(logs))
            .with_forge(self.forge.clone(), None);
        self.rt.block_on(execute(Arc::new(p.graph.clone()), Arc::new(applier), 10, |_| {}))
    }

    fn apply(&mut self, d: &Desired) {
        let report = self.try_apply(d);
        assert!(report.succeeded(), "{:?}", report.outcomes);
        // The machine side: each configured runner shows up on the forge.
        for root in self.roots() {
            runner_comes_online(&self.forge, &root.join("actions-runner"));
        }
    }

    fn roots(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("sandboxes"))
            .map(|r| r.map(|e| e.unwrap().path().join("root")).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Issue 13.3: the agent download is checked against its sha256 before it is unpacked; a mismatch, or a download
/// of its own URL with no checksum given, fails the step and leaves no agent behind.
#[test]
fn the_agent_download_is_verified_before_it_is_unpacked() {
    for (what, sum) in [("a wrong sha256", Some("0".repeat(64))), ("no sha256", None)] {
        let mut w = World::new();
        let (url, _) = fake_runner(w.dir.path());
        let mut forge = FakeForge::new(url);
        if let Some(s) = &sum {
            forge = forge.with_sha256("linux-x64", s);
        }
        w.forge = Arc::new(forge);
        let d = w.desired("linux", "persistent");
        let report = w.try_apply(&d);
        assert!(!report.succeeded(), "{what}: the apply succeeded");
        let errors: Vec<String> = report
            .outcomes
            .values()
            .filter_map(|o| match o {
                nimbus::engine::walk::Outcome::Failed(e) => Some(e.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 2, "{what}: {errors:?}");
        let want = if sum.is_some() { "has sha256" } else { "add forge.runner_sha256.linux-x64" };
        assert!(errors.iter().all(|e| e.contains(want)), "{what}: {errors:?}");
        for root in w.roots() {
            let dir = root.join("actions-runner");
            assert!(!dir.join("config.sh").exists() && !dir.join("runner.tgz").exists(), "{what}: an agent was left");
        }
        assert!(w.forge.runners().is_empty());
    }
}

fn kinds(p: &nimbus::core::plan::Plan) -> Vec<&'static str> {
    p.actions().map(|(_, a)| a.kind.name()).collect()
}

#[test]
fn persistent_runners_register_converge_and_drift() {
    let mut w = World::new();
    let d = w.desired("linux, docker", "persistent");
    let first = w.plan(&d);
    assert_eq!(kinds(&first).iter().filter(|k| **k == "register_runner").count(), 2);
    w.apply(&d);
    let runners = w.forge.runners();
    assert_eq!(runners.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["nimbus.t.p.0", "nimbus.t.p.1"]);
    assert_eq!(runners[0].labels, ["linux", "docker"]);
    for root in w.roots() {
        assert_eq!(std::fs::read_to_string(root.join("actions-runner/.service")).unwrap(), "install\nstart\n");
    }
    assert!(w.plan(&d).is_empty(), "converged");

    // Labels change in place, without touching the machines.
    let d2 = w.desired("linux, docker, big", "persistent");
    let p = w.plan(&d2);
    assert_eq!(kinds(&p), ["update_runner_labels", "update_runner_labels"]);
    w.apply(&d2);
    assert!(w.forge.runners().iter().all(|r| r.labels == ["linux", "docker", "big"]));
    assert!(w.plan(&d2).is_empty());

    // A ghost runner (registered, no machine) and a machine whose runner vanished are drift.
    w.forge.add_runner("nimbus.t.p.7", &["linux"]);
    w.forge.add_runner("someone-elses-runner", &[]);
    let gone = w.forge.runners().iter().find(|r| r.name == "nimbus.t.p.1").unwrap().id;
    w.rt.block_on(w.forge.delete_runner(gone)).unwrap();
    let p = w.plan(&d2);
    let doc = PlanDocument::from_plan(&p, None, None);
    let addrs: Vec<(&str, &str)> =
        doc.resource_changes.iter().map(|c| (c.address.as_str(), c.reason.as_str())).collect();
    assert_eq!(
        addrs,
        [("p[1]", "runner is not registered"), ("runner.nimbus.t.p.7", "runner is registered but has no machine")]
    );
    w.apply(&d2);
    assert!(w.plan(&d2).is_empty());
    let names: Vec<String> = w.forge.runners().into_iter().map(|r| r.name).collect();
    assert!(names.contains(&"someone-elses-runner".to_string()), "other runners are never touched");

    // Secrets: no registration token in plans, logs or the machines' state.
    let tokens = w.forge.tokens_issued();
    assert!(tokens.len() >= 3);
    let mut haystack = w.outputs.clone();
    for entry in walk(&w.dir.path().join("logs")) {
        haystack.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    for root in w.roots() {
        haystack.push_str(&String::from_utf8_lossy(&std::fs::read(root.join("var/lib/nimbus/state.db")).unwrap()));
    }
    for t in &tokens {
        assert!(!haystack.contains(t.as_str()), "a registration token leaked");
    }
    // The runner state on the machine names the runner and its labels, nothing secret.
    let db = nimbus::state::machine_db::StateDb::from_bytes(
        &std::fs::read(w.roots()[0].join("var/lib/nimbus/state.db")).unwrap(),
    )
    .unwrap();
    let r = db.runner.unwrap();
    assert_eq!((r.name.as_str(), r.mode.as_str()), ("nimbus.t.p.0", "persistent"));
}

#[test]
fn ephemeral_runners_use_jit_config() {
    let mut w = World::new();
    let d = w.desired("linux", "ephemeral");
    w.apply(&d);
    assert_eq!(w.forge.calls().iter().filter(|c| c.ends_with("generate-jitconfig")).count(), 2);
    for root in w.roots() {
        let jit = std::fs::read_to_string(root.join("actions-runner/.jitconfig")).unwrap();
        assert!(jit.starts_with("FAKE-TOKEN-"), "run.sh got the JIT config on its command line");
    }
    assert!(w.plan(&d).is_empty());
    let db = nimbus::state::machine_db::StateDb::from_bytes(
        &std::fs::read(w.roots()[0].join("var/lib/nimbus/state.db")).unwrap(),
    )
    .unwrap();
    assert_eq!(db.runner.unwrap().mode, "ephemeral");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// Issue 11: a runner that picks up a job between plan and apply is not killed: the forge refuses to delete
/// it, the removal becomes deferred, and the apply succeeds. Once the job ends, the next apply removes it.
#[test]
fn a_runner_that_picks_up_a_job_after_the_plan_is_not_killed() {
    use nimbus::engine::apply::Session;
    use nimbus::state::journal::{Retention, RunStatus};
    let mut w = World::new();
    let d = w.desired("linux", "persistent");
    w.apply(&d);
    let mut smaller = d.clone();
    smaller.pools[0].count = 1;
    let p = w.plan(&smaller);
    assert!(p.deferred.is_empty(), "both runners are idle at plan time");
    let doc = PlanDocument::from_plan(&p, None, None);
    // The job starts after the plan was made.
    w.forge.set_busy("nimbus.t.p.1", true);
    let actual = w.actual();
    let applier =
        Applier::new(smaller.clone(), &actual, vec![w.provider.clone()], None).with_forge(w.forge.clone(), None);
    let mut session = Session::open(&w.dir.path().join("journal.db"), Retention::default()).unwrap();
    let run = session.start(&doc, "fleet.yaml", None).unwrap();
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let outcome = w.rt.block_on(session.execute(run, &doc, Arc::new(applier), 10, stop, &mut [])).unwrap();
    assert_eq!(outcome.status, RunStatus::Success, "{:?}", outcome.report.outcomes);
    assert_eq!(outcome.report.deferred.len(), 1);
    assert_eq!(outcome.tally.done.destroy, 0);
    assert!(w.dir.path().join("sandboxes/nimbus.t.p.1/nimbus.json").exists(), "the busy machine was terminated");
    let rows = session.journal().actions(run).unwrap();
    assert!(
        rows.iter().any(|r| r.status == "SKIPPED" && r.error.as_deref().unwrap_or("").contains("deferred")),
        "{rows:?}"
    );
    // The next plan removes the idle machine instead: idle machines go first, and nothing waits.
    let p = w.plan(&smaller);
    let gone: Vec<String> = p
        .actions()
        .filter_map(|(_, a)| match &a.kind {
            nimbus::core::plan::ActionKind::TerminateInstance { machine, .. } => Some(machine.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(gone, ["nimbus.t.p.0"]);
    assert!(p.deferred.is_empty());
    w.apply(&smaller);
    assert!(w.dir.path().join("sandboxes/nimbus.t.p.1/nimbus.json").exists());
    // The job ends: nothing left to do.
    w.forge.set_busy("nimbus.t.p.1", false);
    assert!(w.plan(&smaller).is_empty());
    assert_eq!(w.forge.runners().len(), 1);
}

/// Issue 11: after an ephemeral runner's job, its machine is reimaged (the local provider rebuilds the
/// sandbox), set up again and registered with a new JIT config: the next job sees nothing of the last.
#[test]
fn an_ephemeral_machine_is_clean_for_every_job() {
    let mut w = World::new();
    let d = w.desired("linux", "ephemeral");
    w.apply(&d);
    let root = w.roots()[0].clone();
    let before = w.forge.runners().iter().find(|r| r.name == "nimbus.t.p.0").unwrap().id;
    // The job leaves files behind, then the runner is gone from the forge.
    std::fs::write(root.join("job-leftovers"), "secret build output").unwrap();
    w.forge.complete_job("nimbus.t.p.0");
    let p = w.plan(&d);
    let kinds: Vec<&str> = p.actions().map(|(_, a)| a.kind.name()).collect();
    assert_eq!(kinds, ["reimage_machine", "wait_reachable", "run_setup", "register_runner"]);
    w.apply(&d);
    assert!(!root.join("job-leftovers").exists(), "the next job would see the last one's files");
    assert!(root.join("actions-runner/.jitconfig").exists(), "registered again");
    let after = w.forge.runners().iter().find(|r| r.name == "nimbus.t.p.0").unwrap().id;
    assert_ne!(before, after, "a new JIT runner");
    assert!(w.plan(&d).is_empty());
}

/// Two releases of the fake agent, each with a `RELEASE` file: the URL template (with `{version}`) and the
/// `linux-x64` sha256 of each.
fn agent_releases(dir: &Path, versions: &[&str]) -> (String, Vec<String>) {
    let (_, _) = fake_runner(dir);
    let src = dir.join("runner-src");
    let mut sums = Vec::new();
    for v in versions {
        std::fs::write(src.join("RELEASE"), v).unwrap();
        let tgz = dir.join(format!("runner-{v}-linux-x64.tgz"));
        let ok = std::process::Command::new("tar").arg("czf").arg(&tgz).arg("-C").arg(&src).arg(".").status().unwrap();
        assert!(ok.success());
        sums.push(nimbus::core::model::sha256_hex(&std::fs::read(&tgz).unwrap()));
    }
    (format!("file://{}/runner-{{version}}-{{os}}-{{arch}}.tgz", dir.display()), sums)
}

/// Issue 19.5: `forge.runner_version` is the agent release machines run. A persistent runner with an older one
/// is updated in place, keeping its registration, only while idle: a busy runner waits for its job, and a job's
/// worker found on the machine stops the update before it changes anything.
#[test]
fn an_older_agent_is_updated_in_place_while_its_runner_is_idle() {
    let mut w = World::new();
    let (url, sums) = agent_releases(w.dir.path(), &["2.300.0", "2.321.0"]);
    let forge_at =
        |i: usize, v: &str| Arc::new(FakeForge::new(url.clone()).with_sha256("linux-x64", &sums[i]).with_version(v));
    let desired_at = |w: &World, v: &str| {
        let mut d = w.desired("linux", "persistent");
        d.pools[0].runner.as_mut().unwrap().agent_version = Some(v.into());
        d
    };
    w.forge = forge_at(0, "2.300.0");
    let old = desired_at(&w, "2.300.0");
    w.apply(&old);
    let roots = w.roots();
    let release = |root: &Path| std::fs::read_to_string(root.join("actions-runner/RELEASE")).unwrap();
    assert!(roots.iter().all(|r| release(r) == "2.300.0"));
    let recorded = |w: &World| -> Vec<Option<String>> {
        w.actual()
            .machines
            .iter()
            .map(|m| match &m.on_machine {
                nimbus::core::model::OnMachine::Read { state } => {
                    state.runner.as_ref().and_then(|r| r.agent_version.clone())
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(recorded(&w), [Some("2.300.0".to_string()), Some("2.300.0".to_string())]);
    assert!(kinds(&w.plan(&old)).is_empty(), "converged");

    // The fleet file moves to 2.321.0 while t-p-0's runner runs a job (the forge keeps its runners).
    let runners = w.forge.runners();
    let new_forge = forge_at(1, "2.321.0");
    for r in &runners {
        new_forge.add_runner(&r.name, &r.labels.iter().map(String::as_str).collect::<Vec<_>>());
        new_forge.set_online(&r.name, true);
    }
    w.forge = new_forge;
    let busy = runners.iter().map(|r| r.name.clone()).min().unwrap();
    w.forge.set_busy(&busy, true);
    let new = desired_at(&w, "2.321.0");
    let p = w.plan(&new);
    assert_eq!(kinds(&p), ["update_runner_agent"]);
    assert_eq!(p.deferred.len(), 1, "the busy runner's update waits for its job");
    let report = w.try_apply(&new);
    assert!(report.succeeded(), "{:?}", report.outcomes);
    let (busy_root, idle_root) = (&roots[0], &roots[1]);
    assert_eq!(release(idle_root), "2.321.0", "the idle runner's agent was updated");
    assert_eq!(release(busy_root), "2.300.0", "the busy runner's agent was not touched");
    let idle_dir = idle_root.join("actions-runner");
    assert!(idle_dir.join(".credentials").exists(), "the registration was kept");
    let service = std::fs::read_to_string(idle_dir.join(".service")).unwrap();
    assert!(service.ends_with("stop\nstart\n"), "the agent was stopped and started again: {service:?}");
    assert!(
        w.forge.calls().iter().all(|c| !c.starts_with("DELETE")),
        "nothing was deregistered: {:?}",
        w.forge.calls()
    );

    // The job ends; a job's worker shows up on the machine before the update runs: the update stops, unchanged.
    w.forge.set_busy(&busy, false);
    let worker_dir = tempfile::tempdir().unwrap();
    let worker = worker_dir.path().join("Runner.Worker");
    std::fs::copy("/bin/sleep", &worker).unwrap();
    let mut job = std::process::Command::new(&worker).arg("30").spawn().unwrap();
    let report = w.try_apply(&new);
    job.kill().unwrap();
    job.wait().unwrap();
    assert!(!report.succeeded());
    let failed = format!("{:?}", report.outcomes);
    assert!(failed.contains("a job is running on"), "{failed}");
    assert_eq!(release(busy_root), "2.300.0");

    // Idle at last: updated, recorded, converged.
    let report = w.try_apply(&new);
    assert!(report.succeeded(), "{:?}", report.outcomes);
    assert_eq!(release(busy_root), "2.321.0");
    assert_eq!(recorded(&w), [Some("2.321.0".to_string()), Some("2.321.0".to_string())]);
    assert!(kinds(&w.plan(&new)).is_empty(), "converged");
}

/// Issue 22.1 end to end on local sandboxes: a GitLab pool's runner is created (`POST /user/runners`), the
/// (fake) `gitlab-runner` downloaded, checked and registered with the token from its environment; it verifies
/// with the server and goes online, takes a job, and the drain rules hold: a scale-down waits for the job,
/// then removes the machine and deletes the runner.
#[test]
fn a_gitlab_runner_registers_takes_a_job_and_is_drained() {
    use crate::conformance::gitlab_fake::{GitlabFake, TOKEN, fake_agent};
    let fake = GitlabFake::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, sum) = fake_agent(dir.path());
    let fleet = |count: u32| {
        format!(
            "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\nforge:\n  type: gitlab\n  url: {}\n  token: {{env: GITLAB_TEST_TOKEN}}\n  runner_type: group\n  group_id: 7\n  projects: [11]\n  runner_download_url: \"{url}\"\n  runner_sha256: {{linux-amd64: {sum}}}\npools:\n  - name: p\n    provider: local\n    count: {count}\n    machine: {{os: linux, arch: x86_64, image: img}}\n    runner:\n      labels: [build]\n",
            fake.url
        )
    };
    let env = [("GITLAB_TEST_TOKEN", TOKEN.to_string())];
    let run = |args: &[&str]| nimbus_env(dir.path(), args, &env);
    std::fs::write(dir.path().join("fleet.yaml"), fleet(1)).unwrap();
    let o = run(&["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let runners = fake.runners();
    assert_eq!(runners.len(), 1, "{runners:?}");
    assert_eq!((runners[0].description.as_str(), runners[0].tags.clone()), ("nimbus.t.p.0", vec!["build".to_string()]));
    assert!(runners[0].contacted, "the agent verified its token with the server: online");
    assert!(!text(&o).contains(&runners[0].token), "the runner token was printed");
    assert_eq!(run(&["plan", "--detailed-exitcode"]).status.code(), Some(0), "converged");

    // A job for its tags: the agent takes it.
    let job = fake.queue_job_for(11, &["build"], 8);
    let t0 = std::time::Instant::now();
    while fake.job(job).unwrap().status != "running" {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the agent never took the job");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Scale to zero while it runs: nothing is removed; the plan says it waits for the job.
    std::fs::write(dir.path().join("fleet.yaml"), fleet(0)).unwrap();
    let o = run(&["plan", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["actions"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["deferred"].as_array().unwrap().iter().any(|d| d["kind"] == "busy_runner"), "{v}");
    assert_eq!(run(&["apply", "--auto-approve"]).status.code(), Some(0));
    assert_eq!(fake.runners().len(), 1, "the busy runner stays");
    // The job ends: the machine goes, and its runner is deleted.
    while fake.job(job).unwrap().status == "running" {
        assert!(t0.elapsed() < std::time::Duration::from_secs(40), "the job never ended");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(fake.job(job).unwrap().status, "success");
    let o = run(&["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(fake.runners().is_empty(), "{:?}", fake.runners());
    assert_eq!(run(&["plan", "--detailed-exitcode"]).status.code(), Some(0));
}

fn forgejo_fleet(url: &str, agent: &str, sum: &str, flavour: &str, count: u32, mode: &str) -> String {
    format!(
        "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\nforge:\n  type: forgejo\n  url: {url}\n  token: {{env: FORGEJO_TEST_TOKEN}}\n  flavour: {flavour}\n  scope: {{org: acme}}\n  runner_download_url: \"{agent}\"\n  runner_sha256: {{linux-amd64: {sum}}}\npools:\n  - name: p\n    provider: local\n    count: {count}\n    machine: {{os: linux, arch: x86_64, image: img}}\n    runner:\n      labels: [build]\n      mode: {mode}\n"
    )
}

/// Issue 22.2 end to end on local sandboxes: a Forgejo runner made through the API gets its `.runner` file,
/// connects, takes a job, and is drained on scale-down; on Gitea the runner registers itself with a
/// registration token read from a file (never a command line).
#[test]
fn forgejo_and_gitea_runners_register_take_jobs_and_drain() {
    use crate::conformance::forgejo_fake::{ForgejoFake, TOKEN, fake_agent};
    for gitea in [false, true] {
        let fake = ForgejoFake::start(gitea);
        let dir = tempfile::tempdir().unwrap();
        let (agent, sum) = fake_agent(dir.path());
        let flavour = if gitea { "gitea" } else { "forgejo" };
        let write = |count: u32| {
            std::fs::write(
                dir.path().join("fleet.yaml"),
                forgejo_fleet(&fake.url, &agent, &sum, flavour, count, "persistent"),
            )
            .unwrap()
        };
        let env = [("FORGEJO_TEST_TOKEN", TOKEN.to_string())];
        let run = |args: &[&str]| nimbus_env(dir.path(), args, &env);
        write(1);
        let o = run(&["apply", "--auto-approve"]);
        assert_eq!(o.status.code(), Some(0), "{flavour}: {}", text(&o));
        let job = fake.queue_job(&["build"], 6);
        let t0 = std::time::Instant::now();
        while fake.job(job).unwrap().status != "running" {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{flavour}: the runner never took the job");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let runners = fake.runners();
        assert_eq!(runners.len(), 1, "{flavour}: {runners:?}");
        assert_eq!(runners[0].name, "nimbus.t.p.0");
        assert_eq!(runners[0].labels, ["build"], "{flavour}: the runner declared its labels");
        assert!(!text(&o).contains(&runners[0].token), "{flavour}: the runner token was printed");
        // Scale to zero during the job: it waits; after the job, the machine and its runner go.
        write(0);
        let o = run(&["plan", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["actions"].as_array().unwrap().is_empty(), "{flavour}: {v}");
        assert!(v["deferred"].as_array().unwrap().iter().any(|d| d["kind"] == "busy_runner"), "{flavour}: {v}");
        while fake.job(job).unwrap().status == "running" {
            assert!(t0.elapsed() < std::time::Duration::from_secs(40), "{flavour}: the job never ended");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let o = run(&["apply", "--auto-approve"]);
        assert_eq!(o.status.code(), Some(0), "{flavour}: {}", text(&o));
        assert!(fake.runners().is_empty(), "{flavour}: {:?}", fake.runners());
        // The registration token never reached a file that stays, nor the state.
        for f in walk(dir.path()) {
            let body = std::fs::read(&f).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&body).contains("REGTOKEN0123456789") || f.ends_with("fleet.yaml"),
                "{flavour}: {} holds the registration token",
                f.display()
            );
        }
    }
}
