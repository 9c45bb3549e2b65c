//! Issue 19 (first part): the controller. Iterations of `engine::reconcile::iterate` against local sandboxes
//! and the stateful fake forge (jobs queued, started and finished), and `nimbus reconcile` end to end:
//! demand-driven pools, idle timeouts, the auto-apply policy, signals.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use nimbus::engine::reconcile::{Iteration, Policy, iterate};
use nimbus::forges::Forge;
use nimbus::forges::fake::FakeForge;
use nimbus::providers::Provider;
use nimbus::providers::local::LocalProvider;

fn fleet(pool: &str, mode: &str) -> String {
    format!(
        "version: 1\ntenant: t\nproviders:\n  local: {{type: local}}\nforge:\n  type: github\n  app_id: 1\n  installation_id: 2\n  private_key: {{env: UNUSED_IN_THIS_TEST}}\n  org: acme\npools:\n  - name: p\n    provider: local\n{pool}    machine: {{os: linux, arch: x86_64, image: img}}\n    runner:\n      labels: [build]\n      mode: {mode}\n    setup:\n      - name: base\n        run: echo base\n"
    )
}

struct Loop {
    dir: tempfile::TempDir,
    forge: Arc<FakeForge>,
    provider: Arc<dyn Provider>,
    rt: tokio::runtime::Runtime,
}

impl Loop {
    fn new(pool: &str, mode: &str) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let (url, sha256) = fake_runner(dir.path());
        std::fs::write(dir.path().join("fleet.yaml"), fleet(pool, mode)).unwrap();
        let provider: Arc<dyn Provider> = Arc::new(LocalProvider::new("local", "t", dir.path().join("sandboxes")));
        Loop {
            forge: Arc::new(FakeForge::new(url).with_sha256("linux-x64", &sha256)),
            provider,
            dir,
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn write(&self, pool: &str, mode: &str) {
        std::fs::write(self.dir.path().join("fleet.yaml"), fleet(pool, mode)).unwrap();
    }

    /// One iteration, then the machine side: runners configured by it come online.
    fn iterate(&self) -> Iteration {
        let loaded = nimbus::config::load(&self.dir.path().join("fleet.yaml")).unwrap();
        let stop = Arc::new(tokio::sync::watch::channel(false).0);
        let it = self
            .rt
            .block_on(iterate(
                &loaded,
                None,
                std::slice::from_ref(&self.provider),
                Some(self.forge.clone() as Arc<dyn Forge>),
                &Policy::from_config(loaded.config.reconcile.as_ref()),
                stop,
                Duration::from_secs(60),
            ))
            .unwrap();
        assert!(it.errors.is_empty(), "{:?}", it.errors);
        for root in self.roots() {
            runner_comes_online(&self.forge, &root.join("actions-runner"));
            // An ephemeral (JIT) runner is there as soon as it is registered; its agent starts it.
            if root.join("actions-runner/.jitconfig").exists() {
                let name = root.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
                self.forge.set_online(&name, true);
            }
        }
        it
    }

    fn roots(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("sandboxes"))
            .map(|r| {
                r.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path().join("root"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn machines(&self) -> usize {
        self.roots().len()
    }

    fn journal(&self) -> nimbus::state::journal::Journal {
        nimbus::state::journal::Journal::open(&self.dir.path().join(".nimbus/journal.db")).unwrap()
    }
}

/// 10 queued jobs: the pool grows to its `max` (and no further); the jobs that cannot be served are waiting.
/// Jobs for labels no pool has do not grow it.
#[test]
fn queued_jobs_scale_a_pool_up_to_its_max() {
    let l = Loop::new("    scale: {min: 0, max: 3, idle: 0, idle_timeout: 1h}\n", "persistent");
    let it = l.iterate();
    assert_eq!(l.machines(), 0, "no demand, min 0: nothing");
    assert!(it.run.is_none(), "an iteration that changes nothing is no run");
    for _ in 0..10 {
        l.forge.queue_job(&["self-hosted", "Linux", "build"]);
    }
    l.forge.queue_job(&["self-hosted", "gpu"]);
    let it = l.iterate();
    assert_eq!(l.machines(), 3, "{:?}", it.demand);
    assert_eq!(it.done.add, 3);
    let d = &it.demand.pools[0];
    assert_eq!((d.queued, d.wanted, d.count), (10, 3, 3), "{d:?}");
    // The runners came online and take jobs; the pool stays at max while the queue lasts.
    let jobs = l.forge.queued();
    for (j, r) in jobs.iter().zip(["nimbus.t.p.0", "nimbus.t.p.1", "nimbus.t.p.2"]) {
        assert!(l.forge.start_job(j.id, r), "{r} takes a job");
    }
    let it = l.iterate();
    assert_eq!(l.machines(), 3);
    assert!(it.run.is_none(), "{:?}", it.demand);
    // The iteration is a run of `reconcile` by actor `reconcile` in the journal.
    let runs = l.journal().runs(10).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!((runs[0].command.as_str(), runs[0].actor.as_deref()), ("reconcile", Some("reconcile")));
}

/// Jobs finish, runners idle: scale-in waits for `idle_timeout`, removes only runners idle that long (the
/// longest idle first), never a busy one, and keeps `min`.
#[test]
fn scale_in_waits_for_the_idle_timeout_and_never_takes_a_busy_runner() {
    let l = Loop::new("    scale: {min: 2, max: 3, idle: 0, idle_timeout: 2s}\n", "persistent");
    for _ in 0..3 {
        l.forge.queue_job(&["build"]);
    }
    l.iterate();
    assert_eq!(l.machines(), 3);
    let jobs = l.forge.queued();
    // One runner takes a job and keeps it; the queue is otherwise gone (cancelled).
    assert!(l.forge.start_job(jobs[0].id, "nimbus.t.p.1"));
    for j in &jobs[1..] {
        assert!(l.forge.start_job(j.id, "nimbus.t.p.2"));
        l.forge.set_busy("nimbus.t.p.2", false);
    }
    // Idle, but not for long: nothing is removed.
    let it = l.iterate();
    assert_eq!(l.machines(), 3, "{:?}", it.demand);
    std::thread::sleep(Duration::from_millis(2200));
    let it = l.iterate();
    assert_eq!(it.done.destroy, 1, "{:?}", it.demand);
    assert_eq!(it.demand.pools[0].removing.len(), 1, "{:?}", it.demand);
    let left: Vec<String> =
        l.roots().iter().map(|r| r.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(left.contains(&"nimbus.t.p.1".to_string()), "the busy runner's machine stays: {left:?}");
    assert_eq!(left.len(), 2, "min 2, the busy one among them: {left:?}");
    // Never flaps: the next iteration leaves it as it is.
    let it = l.iterate();
    assert!(it.run.is_none(), "{:?}", it.demand);
}

/// An ephemeral pool keeps its size across 20 jobs, nobody running `apply`: after each job the controller
/// reimages the machine and registers a new runner.
#[test]
fn an_ephemeral_pool_stays_at_its_size_across_20_jobs() {
    let l = Loop::new("    count: 2\n", "ephemeral");
    l.iterate();
    assert_eq!(l.forge.runners().len(), 2);
    for job in 0..20 {
        let name = format!("nimbus.t.p.{}", job % 2);
        let id = l.forge.queue_job(&["build"]);
        assert!(l.forge.start_job(id, &name), "job {job}: {name} is there and idle");
        // The JIT runner ran its one job: GitHub removes it.
        l.forge.complete_job(&name);
        let it = l.iterate();
        assert!(it.errors.is_empty(), "job {job}: {:?}", it.errors);
        let online: Vec<_> = l.forge.runners().into_iter().filter(|r| r.online && !r.busy).collect();
        assert_eq!(online.len(), 2, "job {job}: {online:?}");
    }
    assert_eq!(l.machines(), 2);
}

/// What the controller does by itself is its policy: a replacement the fleet file asks for, and removing a
/// pool, wait for a person (pending review); `auto_apply` can allow them.
#[test]
fn replacements_and_pool_removals_wait_for_review_unless_the_policy_allows_them() {
    let l = Loop::new("    count: 1\n", "persistent");
    l.iterate();
    let fleet = std::fs::read_to_string(l.dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(l.dir.path().join("fleet.yaml"), fleet.replace("image: img", "image: img2")).unwrap();
    let it = l.iterate();
    assert!(it.run.is_none(), "{it:?}");
    assert_eq!(it.pending_review.len(), 1, "{it:?}");
    assert!(it.pending_review[0].contains("image changes"), "{:?}", it.pending_review);
    let fleet = std::fs::read_to_string(l.dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(l.dir.path().join("fleet.yaml"), format!("{fleet}reconcile:\n  auto_apply: [scale, replace]\n"))
        .unwrap();
    let it = l.iterate();
    assert_eq!(it.done.add + it.done.destroy, 2, "replaced: {it:?}");
    assert!(it.pending_review.is_empty());
    l.write("    count: 1\n", "persistent");
}

fn nimbus_reconcile(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .arg("reconcile")
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill").args(["-s", sig, &child.id().to_string()]).status().unwrap().success());
}

/// `nimbus reconcile --once` converges the quickstart; the loop, sent SIGTERM mid-iteration, lets the running
/// actions finish, leaves no EXECUTING action and no lock, and exits 0.
#[test]
fn the_loop_converges_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    let o = nimbus_reconcile(dir.path(), &["--once"]).wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reconcile #1: run 1: 2 added"), "{}", text(&o));
    assert_eq!(nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &[]).status.code(), Some(0));

    // Slow machines, more of them: SIGTERM while the iteration applies.
    let fleet = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap();
    let slow =
        fleet.replace("count: 2", "count: 4").replace("    type: local\n", "    type: local\n    action_delay: 2s\n");
    std::fs::write(dir.path().join("fleet.yaml"), slow).unwrap();
    let child = nimbus_reconcile(dir.path(), &["--interval", "1h"]);
    let journal = dir.path().join(".nimbus/journal.db");
    let t0 = std::time::Instant::now();
    loop {
        let j = nimbus::state::journal::Journal::open(&journal).unwrap();
        let executing = j.latest_run().unwrap().filter(|r| *r > 1).map(|r| j.actions(r).unwrap()).unwrap_or_default();
        if executing.iter().any(|a| a.status == "EXECUTING") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the second iteration never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reconcile: stopped"), "{}", text(&o));
    let j = nimbus::state::journal::Journal::open(&journal).unwrap();
    let run = j.latest_run().unwrap().unwrap();
    let actions = j.actions(run).unwrap();
    assert!(actions.iter().all(|a| a.status != "EXECUTING"), "{actions:?}");
    assert!(actions.iter().any(|a| a.status == "SUCCESS"), "running actions finished: {actions:?}");
    assert_eq!(j.runs(1).unwrap()[0].status, "INTERRUPTED");
    // No lock is left: an apply can run at once, and finishes the job.
    let o = nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// SIGHUP reloads the fleet file; a broken one is reported and the one loaded before is kept.
#[test]
fn sighup_reloads_the_fleet_file_and_keeps_the_old_one_when_it_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    let child = nimbus_reconcile(dir.path(), &["--interval", "300ms"]);
    let local = dir.path().join(".nimbus/local");
    let count = || {
        std::fs::read_dir(&local)
            .map(|r| r.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
            .unwrap_or(0)
    };
    let wait = |n: usize| {
        let t0 = std::time::Instant::now();
        while count() != n {
            assert!(t0.elapsed() < Duration::from_secs(30), "never reached {n} machines (at {})", count());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait(2);
    let fleet = std::fs::read_to_string(dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(
        dir.path().join("fleet.yaml"),
        fleet.replace("count: 2", "count: 3").replace("provider: local", "provider: locl"),
    )
    .unwrap();
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count(), 2, "the broken file was not used");
    std::fs::write(dir.path().join("fleet.yaml"), fleet.replace("count: 2", "count: 3")).unwrap();
    signal(&child, "HUP");
    wait(3);
    signal(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not valid; keeping the one loaded before") && err.contains("locl"), "{err}");
    assert!(err.contains("reloaded"), "{err}");
}

/// A pool has a fixed `count` or follows demand within `scale`: neither, both, or bounds that hold no machine
/// are errors at the file's line, with a hint, before anything is touched.
#[test]
fn a_pool_has_a_count_or_a_scale() {
    let dir = tempfile::tempdir().unwrap();
    for (pool, want) in [
        ("", "has neither `count` nor `scale`"),
        ("    count: 1\n    scale: {max: 2}\n", "has both `count` and `scale`"),
        ("    scale: {min: 3, max: 2}\n", "scales within 3..2, which holds no machine"),
        ("    scale: {max: 2, idle: 5}\n", "keeps more idle runners than its `max`"),
        ("    scale: {max: 2, schedule: [{time_zone: Mars/Olympus, min: 1}]}\n", "is not an IANA time zone"),
        ("    scale: {max: 2, schedule: [{hours: 9-5, min: 1}]}\n", "is not a span of hours"),
        ("    scale: {max: 2, schedule: [{min: 3}]}\n", "asks for more than its `max`"),
    ] {
        std::fs::write(dir.path().join("fleet.yaml"), fleet(pool, "persistent")).unwrap();
        let o = nimbus_env(dir.path(), &["validate"], &[]);
        assert_eq!(o.status.code(), Some(1), "{pool}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want) && err.contains("fleet.yaml:") && err.contains("help:"), "{pool}: {err}");
    }
    std::fs::write(
        dir.path().join("fleet.yaml"),
        fleet("    scale: {max: 4, idle: 1, idle_timeout: 15m}\n", "persistent"),
    )
    .unwrap();
    let o = nimbus_env(dir.path(), &["validate"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `nimbus plan` says which changes the controller leaves for a person.
#[test]
fn plan_shows_what_the_controller_leaves_for_review() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = std::fs::read_to_string("examples/quickstart/fleet.yaml").unwrap() + "reconcile:\n  interval: 1m\n";
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    assert_eq!(nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]).status.code(), Some(0));
    std::fs::write(dir.path().join("fleet.yaml"), fleet.replace("image: ubuntu-24.04", "image: ubuntu-26.04")).unwrap();
    let o = nimbus_env(dir.path(), &["plan"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("`nimbus reconcile` leaves this for review").count(), 2, "{out}");
    let o = nimbus_env(dir.path(), &["plan", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pending_review"], serde_json::json!(["linux[0]", "linux[1]"]));
}

/// A real Prometheus scrapes `nimbus reconcile --listen`: the series are there, with the fleet's values, as its
/// query API reports them; `/healthz` answers 200 while iterations succeed.
#[test]
fn prometheus_scrapes_the_controllers_metrics() {
    let Some(prom) = peer("NIMBUS_PROMETHEUS_URL", "prometheus") else { return };
    let targets = std::path::PathBuf::from(std::env::var("NIMBUS_PROMETHEUS_TARGETS").unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("examples/quickstart/fleet.yaml", dir.path().join("fleet.yaml")).unwrap();
    let mut child = nimbus_reconcile(dir.path(), &["--interval", "1s", "--listen", "127.0.0.1:0"]);
    // The address it serves on, from its first line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("reconcile: serving /metrics and /healthz on http://") {
                let _ = tx.send(addr.to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(all);
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("it says where it listens");
    let test = unique_tenant("scrape");
    let file = targets.join(format!("{test}.json"));
    std::fs::write(&file, format!(r#"[{{"targets": ["{addr}"], "labels": {{"test": "{test}"}}}}]"#)).unwrap();
    let query = |q: &str| -> Option<f64> {
        let url = format!("{prom}/api/v1/query");
        let o = Command::new("curl")
            .args(["-s", "--get", &url, "--data-urlencode", &format!("query={q}")])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let t0 = std::time::Instant::now();
    let machines = loop {
        if let Some(v) = query(&format!("sum(nimbus_machines{{test=\"{test}\",pool=\"linux\"}})")).filter(|v| *v == 2.0)
        {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "Prometheus never scraped 2 machines from {addr}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(machines, 2.0);
    assert_eq!(query(&format!("nimbus_machines{{test=\"{test}\",pool=\"linux\",state=\"ready\"}}")), Some(2.0));
    let iterations =
        query(&format!("sum(nimbus_reconcile_iterations_total{{test=\"{test}\",outcome=\"success\"}})")).unwrap();
    assert!(iterations >= 1.0, "{iterations}");
    assert_eq!(query(&format!("nimbus_runners{{test=\"{test}\",pool=\"linux\",state=\"busy\"}}")), Some(0.0));
    assert_eq!(query(&format!("nimbus_pending_review{{test=\"{test}\"}}")), Some(0.0));
    assert_eq!(query(&format!("up{{test=\"{test}\"}}")), Some(1.0));
    // Both machines were made by the first iteration: two launch → ready times.
    assert_eq!(query(&format!("nimbus_time_to_ready_seconds_count{{test=\"{test}\"}}")), Some(2.0));
    let health = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/healthz")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "200");
    std::fs::remove_file(&file).unwrap();
    signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The shipped systemd unit and container file start a command line nimbus accepts, stop it with SIGTERM (and
/// leave it time to finish its actions), reload it with SIGHUP, and never run it as root.
#[test]
fn the_deploy_files_run_the_controller_as_it_expects() {
    use clap::Parser;
    let unit = std::fs::read_to_string("deploy/nimbus-reconcile.service").unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let args: Vec<&str> = std::iter::once("nimbus").chain(exec.split_whitespace().skip(1)).collect();
    let cli = nimbus::cli::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{exec}: {e}"));
    assert!(matches!(cli.command, nimbus::cli::Command::Reconcile(ref r) if r.listen.is_some()), "{exec}");
    assert!(unit.contains("KillSignal=SIGTERM") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let stop: u64 = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).unwrap().trim().parse().unwrap();
    assert!(stop > nimbus::engine::reconcile::DEFAULT_SHUTDOWN_TIMEOUT.as_secs(), "{stop}");
    let user = unit.lines().find_map(|l| l.strip_prefix("User=")).unwrap();
    assert_ne!(user.trim(), "root");

    let cf = std::fs::read_to_string("deploy/Containerfile").unwrap();
    let json = |key: &str| -> Vec<String> {
        let line = cf.lines().rev().find_map(|l| l.strip_prefix(key)).unwrap();
        serde_json::from_str(line.trim()).unwrap()
    };
    let mut args = json("ENTRYPOINT ");
    args.extend(json("CMD "));
    args[0] = "nimbus".into();
    let cli = nimbus::cli::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(matches!(cli.command, nimbus::cli::Command::Reconcile(_)), "{args:?}");
    assert!(cf.contains("USER nonroot") && cf.contains("x86_64-unknown-linux-musl"), "static, non-root");
}

/// `POST /webhook`: a `workflow_job` delivery signed with the fleet's secret (HMAC-SHA256, as GitHub signs)
/// starts the next iteration at once; a forged or unsigned one gets 401, a body over 1 MiB 413, and each is
/// counted. A missed webhook changes nothing: the loop reads the forge every interval anyway.
#[test]
fn a_signed_webhook_wakes_the_loop_and_a_forged_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hook-secret"), "s3cret-hook\n").unwrap();
    let fleet = std::fs::read_to_string("examples/quickstart/fleet.yaml").unwrap()
        + "reconcile:\n  webhook_secret: {file: hook-secret}\n";
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    let mut child = nimbus_reconcile(dir.path(), &["--interval", "1h", "--listen", "127.0.0.1:0"]);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |what: &str| -> String {
        loop {
            let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no line: {what}"));
            if line.contains(what) {
                return line;
            }
        }
    };
    let addr = next("serving /metrics").rsplit("http://").next().unwrap().to_string();
    next("reconcile #1:");
    let body = r#"{"action":"queued","workflow_job":{"id":1,"labels":["self-hosted","linux"]}}"#;
    let sign = |key: &[u8], body: &[u8]| -> String {
        let mac = nimbus::util::secrets::hmac_sha256(key, body);
        format!("sha256={}", mac.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    let post = |event: &str, signature: Option<&str>, body: &[u8]| -> String {
        let mut args = vec![
            "-s".to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "-X".into(),
            "POST".into(),
            "-H".into(),
            format!("X-GitHub-Event: {event}"),
            "--data-binary".into(),
            "@-".into(),
        ];
        if let Some(s) = signature {
            args.extend(["-H".into(), format!("X-Hub-Signature-256: {s}")]);
        }
        args.push(format!("http://{addr}/webhook"));
        let mut c = Command::new("curl").args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(body).unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(post("workflow_job", None, body.as_bytes()), "401", "unsigned");
    assert_eq!(post("workflow_job", Some(&sign(b"wrong", body.as_bytes())), body.as_bytes()), "401", "forged");
    let big = vec![b'x'; 2 << 20];
    assert_eq!(post("workflow_job", Some(&sign(b"s3cret-hook", &big)), &big), "413", "too large");
    assert_eq!(post("ping", Some(&sign(b"s3cret-hook", body.as_bytes())), body.as_bytes()), "200", "ignored");
    // Signed: the next iteration starts now, not in an hour.
    assert_eq!(post("workflow_job", Some(&sign(b"s3cret-hook", body.as_bytes())), body.as_bytes()), "202");
    next("reconcile #2:");
    let m = Command::new("curl").args(["-s", &format!("http://{addr}/metrics")]).output().unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    for (result, n) in [("refused", 2), ("too_large", 1), ("ignored", 1), ("accepted", 1)] {
        assert!(m.contains(&format!("nimbus_webhook_deliveries_total{{result=\"{result}\"}} {n}")), "{result}: {m}");
    }
    signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// `scale.schedule`: a window (days, hours, an IANA time zone, daylight saving included) overrides `min` and
/// `idle` while it holds; hours may cross midnight.
#[test]
fn schedule_windows_hold_in_their_time_zone() {
    use chrono::TimeZone;
    use nimbus::core::model::{ScaleSpec, WindowSpec};
    use nimbus::core::scale::{bounds_at, parse_hours, window_holds};
    let at = |y, m, d, h, min| chrono::Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap();
    let office = WindowSpec {
        days: vec![0, 1, 2, 3, 4],
        hours: parse_hours("08:00-18:00"),
        time_zone: "Europe/Berlin".into(),
        min: Some(4),
        idle: Some(2),
    };
    // Monday 2026-12-07: Berlin is UTC+1.
    assert!(window_holds(&office, at(2026, 12, 7, 7, 30)), "08:30 in Berlin");
    assert!(!window_holds(&office, at(2026, 12, 7, 6, 30)), "07:30 in Berlin");
    assert!(!window_holds(&office, at(2026, 12, 7, 17, 0)), "18:00 in Berlin: the end is excluded");
    assert!(!window_holds(&office, at(2026, 12, 12, 10, 0)), "a Saturday");
    // Summer time: Monday 2026-07-06, Berlin is UTC+2.
    assert!(window_holds(&office, at(2026, 7, 6, 6, 30)), "08:30 CEST");
    assert!(!window_holds(&office, at(2026, 7, 6, 16, 30)), "18:30 CEST");
    // Across midnight: Friday night's window holds early on Saturday, not early on Friday.
    let night = WindowSpec {
        days: vec![4],
        hours: parse_hours("22:00-06:00"),
        time_zone: "UTC".into(),
        min: Some(1),
        idle: None,
    };
    assert!(window_holds(&night, at(2026, 12, 11, 23, 0)) && window_holds(&night, at(2026, 12, 12, 2, 0)));
    assert!(!window_holds(&night, at(2026, 12, 11, 2, 0)));
    let scale =
        ScaleSpec { min: 0, max: 10, idle: 0, idle_timeout: Duration::from_secs(600), schedule: vec![office, night] };
    assert_eq!(bounds_at(&scale, at(2026, 12, 7, 9, 0)), (4, 2));
    assert_eq!(bounds_at(&scale, at(2026, 12, 12, 1, 0)), (1, 0));
    assert_eq!(bounds_at(&scale, at(2026, 12, 13, 12, 0)), (0, 0));
    for bad in ["8-18", "08:00-08:00", "25:00-26:00", "08:60-09:00"] {
        assert_eq!(parse_hours(bad), None, "{bad}");
    }
}

/// A schedule window changes a pool's `min`: while it holds, the pool keeps its machines; once it does not,
/// they go after their idle timeout.
#[test]
fn a_schedule_window_changes_min() {
    use chrono::Timelike;
    let now = chrono::Utc::now();
    let hm = |t: chrono::DateTime<chrono::Utc>| format!("{:02}:{:02}", t.hour(), t.minute());
    // A window that holds now (it began a minute ago, ends in two hours), then one that does not.
    let holding = format!("{}-{}", hm(now - chrono::Duration::minutes(1)), hm(now + chrono::Duration::hours(2)));
    let later = format!("{}-{}", hm(now + chrono::Duration::hours(3)), hm(now + chrono::Duration::hours(4)));
    let pool = |hours: &str| {
        format!(
            "    scale:\n      max: 3\n      idle_timeout: 1s\n      schedule:\n        - {{hours: \"{hours}\", time_zone: UTC, min: 2}}\n"
        )
    };
    let l = Loop::new(&pool(&holding), "persistent");
    let it = l.iterate();
    assert_eq!(l.machines(), 2, "{:?}", it.demand);
    l.write(&pool(&later), "persistent");
    l.iterate(); // the runners' idle clocks start
    std::thread::sleep(Duration::from_millis(1200));
    let it = l.iterate();
    assert_eq!(l.machines(), 0, "min is 0 outside the window: {:?}", it.demand);
}

/// `plan` and `apply` size a pool that follows demand as the controller does: from `min` (and, with a forge,
/// its queued jobs and idle clocks), never back to a fixed number.
#[test]
fn plan_and_apply_size_demand_pools_like_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = std::fs::read_to_string("examples/quickstart/fleet.yaml")
        .unwrap()
        .replace("    count: 2\n", "    scale: {min: 1, max: 3}\n");
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    let o = nimbus_env(dir.path(), &["plan"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Plan: 1 to add"), "{}", text(&o));
    assert_eq!(nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]).status.code(), Some(0));
    // Two more machines appear (the controller made them for demand): plan and apply leave them.
    std::fs::write(dir.path().join("fleet.yaml"), fleet.replace("scale: {min: 1, max: 3}", "scale: {min: 3, max: 3}"))
        .unwrap();
    assert_eq!(nimbus_env(dir.path(), &["apply", "--auto-approve"], &[]).status.code(), Some(0));
    std::fs::write(dir.path().join("fleet.yaml"), &fleet).unwrap();
    let o = nimbus_env(dir.path(), &["plan", "--detailed-exitcode"], &[]);
    assert_eq!(o.status.code(), Some(0), "no idle clock says they may go: {}", text(&o));
}

/// A job that waits longer than `reconcile.alert_after` with no pool able to take it (labels no pool has, or the
/// pool at its `max`) is reported; before that, it is not.
#[test]
fn jobs_no_pool_can_take_are_reported_after_alert_after() {
    let l = Loop::new("    scale: {max: 1, idle_timeout: 1h}\n", "persistent");
    l.forge.queue_job(&["gpu"]);
    for _ in 0..3 {
        l.forge.queue_job(&["build"]);
    }
    let it = l.iterate();
    assert!(it.demand.unserved.is_empty(), "queued just now: {:?}", it.demand.unserved);
    let fleet = std::fs::read_to_string(l.dir.path().join("fleet.yaml")).unwrap();
    std::fs::write(l.dir.path().join("fleet.yaml"), format!("{fleet}reconcile:\n  alert_after: 0s\n")).unwrap();
    let it = l.iterate();
    let whys: Vec<&str> = it.demand.unserved.iter().map(|u| u.why.as_str()).collect();
    assert_eq!(whys.iter().filter(|w| w.contains("no pool has all of these labels")).count(), 1, "{whys:?}");
    assert_eq!(whys.iter().filter(|w| w.contains("is at its max (1)")).count(), 2, "{whys:?}");
}

/// Issue 19.3: the queue-wait histogram (a job queued → started, as the forge shows it leaving the queue) and
/// the API request counters per provider, in the metrics the controller serves.
#[test]
fn queue_waits_and_api_requests_are_in_the_metrics() {
    let l = Loop::new("    scale: {min: 0, max: 2, idle: 0, idle_timeout: 1h}\n", "persistent");
    let metrics = nimbus::engine::metrics::Metrics::new(Duration::from_secs(30));
    let a_minute_ago = chrono::Utc::now() - chrono::Duration::seconds(60);
    let jobs = [l.forge.queue_job_at(&["build"], a_minute_ago), l.forge.queue_job_at(&["build"], a_minute_ago)];
    let it = l.iterate();
    metrics.iteration(&it, Duration::from_millis(5));
    assert!(metrics.encode().contains("nimbus_job_queue_wait_seconds_count 0"), "{}", metrics.encode());
    // One job starts; the other still waits.
    assert!(l.forge.start_job(jobs[0], "nimbus.t.p.0"));
    metrics.iteration(&l.iterate(), Duration::from_millis(5));
    let text = metrics.encode();
    assert!(text.contains("nimbus_job_queue_wait_seconds_count 1"), "{text}");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nimbus_job_queue_wait_seconds_sum "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((60.0..600.0).contains(&sum), "{sum}");
    assert!(l.forge.start_job(jobs[1], "nimbus.t.p.1"));
    metrics.iteration(&l.iterate(), Duration::from_millis(5));
    assert!(metrics.encode().contains("nimbus_job_queue_wait_seconds_count 2"));
    // The local provider's calls (launch, discover, …) are counted as its API requests.
    let requests = text
        .lines()
        .find_map(|l| l.strip_prefix("nimbus_api_requests_total{kind=\"provider\",name=\"local\",outcome=\"ok\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(requests >= 3, "{requests}");
}
