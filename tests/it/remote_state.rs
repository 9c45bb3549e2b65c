//! Issue 14: the S3 state backend against moto's S3 (conditional writes made atomic by the peers' patch, as S3's
//! are). Two clones of one fleet repository share the lock and the journal; machines are local sandboxes in one
//! shared folder (the "cloud" both clones see), slowed down so that applies overlap.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn moto() -> Option<String> {
    peer("NIMBUS_MOTO_URL", "moto (S3)")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn s3(url: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test"))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A fleet repository (git), its bucket, and the shared sandbox folder.
struct Repo {
    url: String,
    origin: tempfile::TempDir,
    cloud: tempfile::TempDir,
    bucket: String,
    key: String,
    env: Vec<(&'static str, String)>,
    tenant: String,
}

impl Repo {
    fn new(url: &str, count: u32, delay: &str, lease: &str) -> Repo {
        let tenant = unique_tenant("s3");
        let bucket = format!("nimbus-{tenant}");
        rt().block_on(async { s3(url).await.create_bucket().bucket(&bucket).send().await.unwrap() });
        let r = Repo {
            url: url.to_string(),
            origin: tempfile::tempdir().unwrap(),
            cloud: tempfile::tempdir().unwrap(),
            key: format!("fleets/{tenant}/journal.db"),
            bucket,
            env: aws_env(url),
            tenant: tenant.clone(),
        };
        r.commit(&r.fleet(&tenant, count, delay, lease));
        r
    }

    fn fleet(&self, tenant: &str, count: u32, delay: &str, lease: &str) -> String {
        format!(
            "version: 1\ntenant: {tenant}\nstate:\n  backend: s3\n  bucket: {}\n  key: {}\n  lock_lease: {lease}\nproviders:\n  local:\n    type: local\n    data_dir: {}\n    action_delay: {delay}\npools:\n  - name: linux\n    provider: local\n    count: {count}\n    machine: {{os: linux, arch: x86_64, image: ubuntu-24.04}}\n",
            self.bucket,
            self.key,
            self.cloud.path().display()
        )
    }

    fn commit(&self, fleet: &str) {
        let dir = self.origin.path();
        std::fs::write(dir.join("fleet.yaml"), fleet).unwrap();
        for args in [
            &["init", "-q", "-b", "main"][..],
            &["add", "fleet.yaml"],
            &["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "fleet"],
        ] {
            let ok = Command::new("git").args(args).current_dir(dir).status().unwrap();
            assert!(ok.success(), "git {args:?}");
        }
    }

    /// A fresh clone: no journal, no lock, nothing of any other checkout's.
    fn clone(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("git")
            .args(["clone", "-q"])
            .arg(self.origin.path())
            .arg(dir.path().join("repo"))
            .status()
            .unwrap();
        assert!(ok.success());
        dir
    }

    fn run(&self, clone: &Path, args: &[&str]) -> Output {
        nimbus_env(&clone.join("repo"), args, &self.env)
    }

    fn spawn(&self, clone: &Path, args: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
        cmd.args(args).current_dir(clone.join("repo")).env("NO_COLOR", "1").env_remove("AWS_PROFILE");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn sandboxes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.cloud.path())
            .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.retain(|n| n.starts_with("nimbus."));
        v.sort();
        v
    }

    /// The lock object's body, if there is one.
    fn lock_body(&self) -> Option<String> {
        rt().block_on(async {
            let out =
                s3(&self.url).await.get_object().bucket(&self.bucket).key(format!("{}.lock", self.key)).send().await;
            match out {
                Ok(o) => Some(String::from_utf8(o.body.collect().await.unwrap().into_bytes().to_vec()).unwrap()),
                Err(_) => None,
            }
        })
    }

    fn journal_exists(&self) -> bool {
        rt().block_on(async {
            s3(&self.url).await.head_object().bucket(&self.bucket).key(&self.key).send().await.is_ok()
        })
    }

    /// Waits until `f` holds (bounded), polling.
    fn wait_for(&self, what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn done(c: Child) -> Output {
    c.wait_with_output().unwrap()
}

/// stderr as one line: miette wraps long messages and draws a margin.
fn flat(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr).replace('│', " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn lock_id(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_string()
}

/// Two applies started at once from two clones: exactly one runs; the other exits 1 naming the holder and the
/// lock's id; the machines are made once.
#[test]
fn two_applies_from_two_clones_one_runs_and_the_other_names_the_holder() {
    let Some(url) = moto() else { return };
    // Slow enough that the two overlap even when the second starts late on a loaded machine.
    let repo = Repo::new(&url, 2, "5s", "30s");
    let (a, b) = (repo.clone(), repo.clone());
    let (pa, pb) =
        (repo.spawn(a.path(), &["apply", "--auto-approve"]), repo.spawn(b.path(), &["apply", "--auto-approve"]));
    let (oa, ob) = (done(pa), done(pb));
    let mut codes = [oa.status.code(), ob.status.code()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(1)], "A:\n{}\nB:\n{}", text(&oa), text(&ob));
    let loser = if oa.status.code() == Some(1) { &oa } else { &ob };
    let err = flat(&loser.stderr);
    assert!(err.contains("the fleet's state is locked by") && err.contains("lock id"), "{err}");
    assert!(err.contains("pid "), "the holder's process is named: {err}");
    assert_eq!(repo.sandboxes().len(), 2, "no machine made twice: {:?}", repo.sandboxes());
    assert!(repo.lock_body().is_none(), "the winner released the lock");
    // Either clone now sees a converged fleet, from the shared journal and the shared cloud.
    for c in [&a, &b] {
        let o = repo.run(c.path(), &["plan", "--detailed-exitcode"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
}

/// kill -9 of the holder: the lock stays; past its lease it is reported as stale (never broken); force-unlock
/// frees it; the next apply, from another clone with no local journal, recovers the killed run's actions from
/// the uploaded journal and converges without duplicates.
#[test]
fn a_killed_holders_lock_goes_stale_and_force_unlock_lets_the_next_apply_recover() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 3, "5s", "3s");
    let (a, b, watcher) = (repo.clone(), repo.clone(), repo.clone());
    let mut holder = repo.spawn(a.path(), &["apply", "--auto-approve"]);
    // Until the bucket's journal shows actions executing (read as any clone reads it: `history`).
    repo.wait_for("executing actions in the bucket", || {
        let o = repo.run(watcher.path(), &["history", "--run", "latest", "--json"]);
        String::from_utf8_lossy(&o.stdout).contains("EXECUTING")
    });
    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();
    let id = lock_id(&repo.lock_body().expect("a killed holder leaves its lock"));

    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let lease_ends = Instant::now() + Duration::from_secs(4);
    let err = flat(&o.stderr);
    assert!(err.contains(&id), "{err}");
    while Instant::now() < lease_ends {
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = flat(&o.stderr);
    assert!(err.contains("the lock is stale") && err.contains("force-unlock"), "{err}");
    assert_eq!(repo.lock_body().map(|b| lock_id(&b)), Some(id.clone()), "a stale lock is never broken by an apply");

    let o = repo.run(b.path(), &["force-unlock", "not-the-id"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = repo.run(b.path(), &["force-unlock", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(repo.lock_body().is_none());

    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("marked ORPHANED"), "the killed run's actions came back from the bucket: {err}");
    assert_eq!(repo.sandboxes().len(), 3, "{:?}", repo.sandboxes());
    let o = repo.run(b.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // History is read from the bucket, by a clone that never applied.
    let c = repo.clone();
    let o = repo.run(c.path(), &["history", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(h.contains("INTERRUPTED"), "the killed run is in the remote history: {h}");
    assert!(h.contains("SUCCESS"), "{h}");
}

/// A second writer of the journal (here: someone overwriting the object mid-apply) fails the next
/// compare-and-swap; the apply stops and says so.
#[test]
fn a_journal_compare_and_swap_conflict_stops_the_apply() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 4, "2s", "30s");
    let a = repo.clone();
    // One action at a time: the conflict is found while most of the plan has not started.
    let apply = repo.spawn(a.path(), &["apply", "--auto-approve", "--parallelism", "1"]);
    repo.wait_for("the journal", || repo.journal_exists() && repo.lock_body().is_some());
    rt().block_on(async {
        s3(&url)
            .await
            .put_object()
            .bucket(&repo.bucket)
            .key(&repo.key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"someone else's journal"))
            .send()
            .await
            .unwrap();
    });
    let o = done(apply);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = flat(&o.stderr);
    assert!(err.contains("changed under this apply: a second writer"), "{err}");
    assert!(err.contains("Apply stopped"), "the walk stopped: {err}");
    assert!(repo.sandboxes().len() < 4, "it went on after the conflict: {:?}", repo.sandboxes());
    assert!(repo.lock_body().is_none(), "the lock is released even so");
}

/// `plan` during an apply works, and takes no lock: the lock is the apply's throughout. The lock's body names
/// its holder and holds no secret.
#[test]
fn plan_during_an_apply_takes_no_lock_and_the_lock_holds_no_secret() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 2, "8s", "30s");
    let (a, b) = (repo.clone(), repo.clone());
    let apply = repo.spawn(a.path(), &["apply", "--auto-approve"]);
    repo.wait_for("the lock", || repo.lock_body().is_some());
    let body = repo.lock_body().unwrap();
    let o = repo.run(b.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(repo.lock_body().map(|b| lock_id(&b)), Some(lock_id(&body)), "the plan left the lock alone");
    assert_eq!(done(apply).status.code(), Some(0));

    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for k in ["id", "user", "host", "pid", "run_id", "created", "expires"] {
        assert!(!v[k].is_null(), "the lock names its holder's {k}: {body}");
    }
    for (k, secret) in &repo.env {
        if k.contains("SECRET") || k.contains("KEY_ID") {
            assert!(!body.contains(secret.as_str()), "{k} in the lock: {body}");
        }
    }
    assert!(!body.to_lowercase().contains("secret") && !body.contains("token"), "{body}");
}

/// A fleet file's `state:` section is checked like the rest: an S3 backend without its bucket or key, or a
/// local one with S3 settings, is an error at the field.
#[test]
fn the_state_section_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let base = "version: 1\ntenant: t\nproviders:\n  local: {type: local}\n";
    for (state, want) in [
        ("state:\n  backend: s3\n  key: k\n", "`state.backend: s3` needs `state.bucket`"),
        ("state:\n  backend: local\n  bucket: b\n", "`state.bucket` is for `backend: s3`"),
        ("state:\n  backend: s3\n  bucket: b\n  key: /k/\n", "`state.key` `/k/` is not usable"),
        ("state:\n  backend: local\n  lock_lease: 1m\n", "`state.lock_lease` is for `backend: s3`"),
        ("state:\n  backend: s3\n  bucket: b\n  key: k\n  lock_lease: 1s\n", "shorter than 3 seconds"),
    ] {
        std::fs::write(dir.path().join("fleet.yaml"), format!("{base}{state}")).unwrap();
        let o = nimbus_env(dir.path(), &["validate"], &[]);
        assert_eq!(o.status.code(), Some(1), "{state}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want) && err.contains("fleet.yaml:"), "{state}: {err}");
    }
    // force-unlock on a local backend says there is nothing to unlock.
    std::fs::write(dir.path().join("fleet.yaml"), base).unwrap();
    let o = nimbus_env(dir.path(), &["force-unlock", "x"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to force-unlock"), "{}", text(&o));
}

/// The holder renews its lease: an apply that outlives its lease is still "locked", never "stale", and the
/// lock's expiry moves on.
#[test]
fn the_holder_renews_its_lease() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 1, "10s", "6s");
    let (a, b) = (repo.clone(), repo.clone());
    let apply = repo.spawn(a.path(), &["apply", "--auto-approve"]);
    repo.wait_for("the lock", || repo.lock_body().is_some());
    let first: serde_json::Value = serde_json::from_str(&repo.lock_body().unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(7000));
    let now: serde_json::Value = serde_json::from_str(&repo.lock_body().expect("still held")).unwrap();
    assert_eq!(now["id"], first["id"]);
    let expiry =
        |v: &serde_json::Value| v["expires"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(expiry(&now) > expiry(&first), "renewed: {first} → {now}");
    assert!(expiry(&now) > chrono::Utc::now(), "the lease is current: {now}");
    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1));
    let err = flat(&o.stderr);
    assert!(err.contains("locked by") && !err.contains("stale"), "{err}");
    assert_eq!(done(apply).status.code(), Some(0));
}

/// A lock force-unlocked under a live apply is lost at its next renewal: that apply starts nothing more and says
/// so.
#[test]
fn an_apply_whose_lock_is_force_unlocked_stops() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 4, "3s", "3s");
    let (a, b) = (repo.clone(), repo.clone());
    let apply = repo.spawn(a.path(), &["apply", "--auto-approve", "--parallelism", "1"]);
    repo.wait_for("the lock", || repo.lock_body().is_some());
    let id = lock_id(&repo.lock_body().unwrap());
    let o = repo.run(b.path(), &["force-unlock", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = done(apply);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = flat(&o.stderr);
    assert!(err.contains("was taken away from this apply"), "{err}");
    assert!(repo.sandboxes().len() < 4, "it went on without its lock: {:?}", repo.sandboxes());
}

/// A write of ours that the SDK retried after its answer was lost finds its own object there: not a conflict.
/// Another body there is one.
#[test]
fn a_retried_upload_of_our_own_is_not_a_second_writer() {
    let Some(url) = moto() else { return };
    use_moto_env(&url);
    let bucket = format!("nimbus-{}", unique_tenant("retry"));
    let config = nimbus::config::StateConfig {
        backend: nimbus::config::StateBackend::S3,
        bucket: Some(bucket),
        key: Some("journal.db".into()),
        region: None,
        endpoint: Some(url.clone()),
        lock_lease: None,
        ..Default::default()
    };
    rt().block_on(async {
        let s = nimbus::state::remote::S3State::from_config(&config).await.unwrap();
        s.create_bucket().await.unwrap();
        let first = s.upload(b"journal one".to_vec(), None).await.unwrap();
        // The same body sent again under the same condition, as a retry would: the object is ours.
        assert_eq!(s.upload(b"journal one".to_vec(), None).await.unwrap(), first);
        let e = s.upload(b"journal two".to_vec(), None).await.unwrap_err();
        assert!(matches!(e, nimbus::state::remote::RemoteError::Conflict { .. }), "{e}");
        let second = s.upload(b"journal two".to_vec(), Some(&first)).await.unwrap();
        let e = s.upload(b"journal three".to_vec(), Some(&first)).await.unwrap_err();
        assert!(matches!(e, nimbus::state::remote::RemoteError::Conflict { .. }), "{e}");
        assert_ne!(first, second);
    });
}

/// A second interrupt exits at once, but frees the lock first: the next apply need not wait out the lease, and
/// recovers the run from the journal last uploaded.
#[test]
fn a_second_interrupt_frees_the_lock_before_exiting() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 2, "8s", "60s");
    let (a, b) = (repo.clone(), repo.clone());
    let apply = repo.spawn(a.path(), &["apply", "--auto-approve"]);
    repo.wait_for("the lock", || repo.lock_body().is_some());
    std::thread::sleep(Duration::from_millis(500));
    for sig in ["INT", "INT"] {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(apply.id().to_string()).status().unwrap();
        assert!(ok.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = done(apply);
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(flat(&o.stderr).contains("Second interrupt"), "{}", text(&o));
    assert!(repo.lock_body().is_none(), "the lock was freed before the exit");
    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(repo.sandboxes().len(), 2, "{:?}", repo.sandboxes());
}

/// Issue 18.1: clone B's apply is killed with `kill -9` while a setup step runs, and its stale S3 lock is
/// force-unlocked. Clone A's apply (another checkout, another path) recognises the setup lock B left on the
/// machine as this fleet's dead run's, stops B's step (its whole process group) and journals that, takes the lock
/// over at once and converges; nobody waits out the step timeouts.
#[test]
fn a_killed_applys_setup_lock_is_taken_over_by_the_fleets_next_apply() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 1, "0s", "30s");
    let mut fleet = repo.fleet(&repo.tenant, 1, "0s", "30s");
    fleet.push_str(
        "    setup:\n      - name: slow\n        run: |\n          if [ -f ../../fast ]; then exit 0; fi\n          sleep 300 &\n          echo $! > sleeper.pid\n          wait\n",
    );
    repo.commit(&fleet);
    let machine = format!("nimbus.{}.linux.0", repo.tenant);
    let root = repo.cloud.path().join(&machine).join("root");
    let (a, b) = (repo.clone(), repo.clone());
    let mut killed = repo.spawn(b.path(), &["apply", "--auto-approve"]);
    repo.wait_for("B's setup step to run", || root.join("sleeper.pid").exists());
    std::thread::sleep(Duration::from_millis(200));
    killed.kill().unwrap(); // SIGKILL: its step's shell lives on, and so does its lock on the machine
    killed.wait().unwrap();
    let sleeper = std::fs::read_to_string(root.join("sleeper.pid")).unwrap().trim().to_string();
    let alive = |pid: &str| Command::new("kill").args(["-0", pid]).status().unwrap().success();
    assert!(alive(&sleeper), "B's step runs on after B was killed");
    assert!(root.join("var/lib/nimbus/.setup.lock").exists(), "B left its setup lock");
    let id = lock_id(&repo.lock_body().expect("a killed holder leaves its lock"));
    let o = repo.run(a.path(), &["force-unlock", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    std::fs::write(repo.cloud.path().join("fast"), "").unwrap();
    let o = repo.run(a.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("another apply is running setup"), "{}", text(&o));
    // The journal (the bucket's, as A's working copy holds it) says what happened.
    let j = nimbus::state::journal::Journal::open(&a.path().join("repo/.nimbus/journal.db")).unwrap();
    let events: Vec<String> = j.events(200).unwrap().into_iter().map(|e| e.message).collect();
    assert!(
        events
            .iter()
            .any(|m| m.contains("took over the setup lock") && m.contains("process group") && m.contains("stopped")),
        "{events:?}"
    );
    let t0 = Instant::now();
    while alive(&sleeper) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(&sleeper), "the dead run's step (process group) was stopped before the lock was taken over");
    let o = repo.run(a.path(), &["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Issue 18.3: once the run is in the journal, the lock's body names it by the number `nimbus history` uses,
/// and the "locked" error names it too.
#[test]
fn the_lock_body_names_the_journal_run() {
    let Some(url) = moto() else { return };
    let repo = Repo::new(&url, 2, "4s", "3s");
    let (a, b) = (repo.clone(), repo.clone());
    let holder = repo.spawn(a.path(), &["apply", "--auto-approve"]);
    let run_id = || {
        repo.lock_body()
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["run_id"].as_str().map(str::to_string))
    };
    repo.wait_for("the lock to name the run", || run_id().is_some_and(|r| r != "pending"));
    let run = run_id().unwrap();
    let n: i64 = run.parse().unwrap_or_else(|_| panic!("a journal run number: {run}"));
    let o = repo.run(b.path(), &["apply", "--auto-approve"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = flat(&o.stderr);
    assert!(err.contains(&format!("run {n} since")), "{err}");
    assert!(err.contains(" ago)") || err.contains("(just now)"), "the start is a time and how long ago: {err}");
    let o = done(holder);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let h = repo.run(b.path(), &["history", "--run", &run, "--json"]);
    assert_eq!(h.status.code(), Some(0), "{}", text(&h));
    let actions: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    assert!(actions.as_array().is_some_and(|a| !a.is_empty()), "the run the lock named is in history: {actions}");
}
