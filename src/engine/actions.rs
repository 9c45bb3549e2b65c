//! Carrying out plan actions against real providers, machines and (later)
//! the forge: the [`ActionRunner`] that `nimbus apply` hands to the executor.
//! Emits the telemetry events (`nimbus.machine.provision_start`, …).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::Instrument;

use crate::config::{Arch, Os, RunnerMode};
use crate::core::model::{Actual, Desired, StepStatus, parse_machine_name};
use crate::core::plan::{Action, ActionKind, HostRef};
use crate::engine::walk::{ActionError, ActionRunner, Outputs};
use crate::forges::{AgentInstall, AgentTarget, Forge};
use crate::providers::{HostRequest, LaunchRequest, MachineRef, Provider};
use crate::state::machine_db::{self, StateDb};
use crate::transport::Transport;
use crate::util::shell;

/// Telemetry event names, per action kind: (start, success, failure). The seed's names where it has them
/// (`nimbus.machine.{provision,setup,terminate}_*`, `nimbus.forge.{register,unregister}_runner_*`); see
/// [`event_aliases`] for what they were called before.
pub fn event_names(kind: &ActionKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        ActionKind::LaunchInstance { .. } => {
            ("nimbus.machine.provision_start", "nimbus.machine.provision_success", "nimbus.machine.provision_failure")
        }
        ActionKind::RunSetup { .. } => {
            ("nimbus.machine.setup_start", "nimbus.machine.setup_success", "nimbus.machine.setup_failure")
        }
        ActionKind::TerminateInstance { .. } => {
            ("nimbus.machine.terminate_start", "nimbus.machine.terminate_success", "nimbus.machine.terminate_failure")
        }
        ActionKind::RegisterRunner { .. } => (
            "nimbus.forge.register_runner_start",
            "nimbus.forge.register_runner_success",
            "nimbus.forge.register_runner_failure",
        ),
        ActionKind::DeregisterRunner { .. } => (
            "nimbus.forge.unregister_runner_start",
            "nimbus.forge.unregister_runner_success",
            "nimbus.forge.unregister_runner_failure",
        ),
        other => event_aliases(other),
    }
}

/// The names events had before the seed's names were adopted (each event carries its old name as `alias`).
pub fn event_aliases(kind: &ActionKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        ActionKind::AllocateHost { .. } => {
            ("nimbus.host.allocate_start", "nimbus.host.allocated", "nimbus.host.allocate_failed")
        }
        ActionKind::RestartRunner { .. } => {
            ("nimbus.runner.restart_start", "nimbus.runner.restarted", "nimbus.runner.restart_failed")
        }
        ActionKind::UpdateRunnerAgent { .. } => {
            ("nimbus.runner.update_agent_start", "nimbus.runner.agent_updated", "nimbus.runner.update_agent_failed")
        }
        ActionKind::ReimageMachine { .. } => {
            ("nimbus.machine.reimage_start", "nimbus.machine.reimaged", "nimbus.machine.reimage_failed")
        }
        ActionKind::UpdateTags { .. } => {
            ("nimbus.machine.tag_start", "nimbus.machine.tagged", "nimbus.machine.tag_failed")
        }
        ActionKind::LaunchInstance { .. } => {
            ("nimbus.machine.provision_start", "nimbus.machine.provision_complete", "nimbus.machine.provision_failed")
        }
        ActionKind::WaitReachable { .. } => {
            ("nimbus.machine.wait_start", "nimbus.machine.reachable", "nimbus.machine.unreachable")
        }
        ActionKind::RepairState { .. } => {
            ("nimbus.machine.repair_start", "nimbus.machine.repaired", "nimbus.machine.repair_failed")
        }
        ActionKind::RunSetup { .. } => ("nimbus.setup.start", "nimbus.setup.complete", "nimbus.setup.failed"),
        ActionKind::RegisterRunner { .. } => {
            ("nimbus.runner.register_start", "nimbus.runner.registered", "nimbus.runner.register_failed")
        }
        ActionKind::UpdateRunnerLabels { .. } => {
            ("nimbus.runner.labels_start", "nimbus.runner.labels_updated", "nimbus.runner.labels_failed")
        }
        ActionKind::DeregisterRunner { .. } => {
            ("nimbus.runner.deregister_start", "nimbus.runner.deregistered", "nimbus.runner.deregister_failed")
        }
        ActionKind::TerminateInstance { .. } => {
            ("nimbus.machine.terminate_start", "nimbus.machine.terminated", "nimbus.machine.terminate_failed")
        }
        ActionKind::ReleaseHost { .. } => {
            ("nimbus.host.release_start", "nimbus.host.released", "nimbus.host.release_failed")
        }
    }
}

fn emit(event: &str, _tenant: &str, machine: &str, duration: Option<Duration>, error: Option<&str>) {
    crate::util::telemetry::seed_event(event, None, machine, duration, error);
}

/// How long a dead apply's setup step gets between TERM and KILL.
const STEP_STOP_GRACE: Duration = Duration::from_secs(5);

/// A machine's setup lock: a folder beside its state database.
const SETUP_LOCK: &str = ".setup.lock";

/// Shell (after `machine_db::locate`) that releases a machine's setup lock.
const UNLOCK_SETUP: &str = "$s rm -rf \"$d/.setup.lock\"";

/// Releases a machine's setup lock: a file operation on a sandbox here, a command otherwise (best effort: a lock
/// left behind is this fleet's own, taken back by its next setup).
async fn release_setup_lock(t: &dyn Transport) {
    match machine_db::local_dir(t) {
        Some(d) => {
            let _ = std::fs::remove_dir_all(d.join(SETUP_LOCK));
        }
        None => {
            let _ = t.exec(&format!("{}; {UNLOCK_SETUP}", machine_db::locate(t.state_path())), b"", None).await;
        }
    }
}

/// Who takes machines' setup locks: the fleet's identity and the journal's run.
#[derive(Debug, Clone, Default)]
struct SetupOwner {
    fleet: String,
    run: i64,
    /// The run's start time in the journal: with the id, names the run even if a lost upload let an id be reused.
    run_started: String,
    /// `alice@ci-7 pid 4242`, for people.
    who: String,
}

fn who() -> String {
    format!(
        "{}@{} pid {}",
        crate::util::actor(),
        crate::util::hostname().unwrap_or_else(|| "unknown".into()),
        std::process::id()
    )
}

/// A setup lock's record, as read from the machine. Records of earlier nimbus versions (`owner\nsince`) have no
/// fleet or run: they are only ever taken back once stale.
#[derive(Debug, Default)]
struct SetupHolder {
    fleet: Option<String>,
    run: Option<(i64, String)>,
    who: Option<String>,
    since: Option<i64>,
}

impl SetupHolder {
    fn parse(text: &str) -> SetupHolder {
        let mut h = SetupHolder::default();
        if !text.starts_with("fleet=") {
            let mut lines = text.lines();
            h.who = lines.next().map(str::to_string).filter(|s| !s.is_empty());
            h.since = lines.next().and_then(|s| s.trim().parse().ok());
            return h;
        }
        for line in text.lines() {
            match line.split_once('=') {
                Some(("fleet", v)) => h.fleet = Some(v.to_string()),
                Some(("run", v)) => {
                    h.run = v.split_once(' ').and_then(|(id, at)| Some((id.parse().ok()?, at.to_string())))
                }
                Some(("who", v)) => h.who = Some(v.to_string()),
                Some(("since", v)) => h.since = v.trim().parse().ok(),
                _ => {}
            }
        }
        h
    }

    /// `fleet `acme/fleet.yaml@s3://b/k`, run 7 (alice@vm pid 42), since 2026-12-06T20:00:00Z (3 min ago)`.
    fn describe(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let mut s = String::new();
        if let Some(f) = &self.fleet {
            s.push_str(&format!("fleet `{f}`"));
        }
        if let Some((id, _)) = &self.run {
            s.push_str(&format!(", run {id}"));
        }
        let who = self.who.as_deref().unwrap_or("an unknown apply");
        s.push_str(&if s.is_empty() { who.to_string() } else { format!(" ({who})") });
        if let Some(t) = self.since.and_then(|t| chrono::DateTime::from_timestamp(t, 0)) {
            s.push_str(&format!(", since {}", crate::util::time::at_ago(&t, &now)));
        }
        s
    }
}

/// Runs plan actions.
pub struct Applier {
    tenant: String,
    desired: Desired,
    providers: HashMap<String, Arc<dyn Provider>>,
    machines: Mutex<HashMap<String, MachineRef>>,
    log_dir: Option<PathBuf>,
    forge: Option<Arc<dyn Forge>>,
    /// Where the runner agent goes (the fleet file's `runner_dir`); `None` is the agent's default.
    runner_dir: Option<String>,
    /// Who holds a machine's setup lock while this applier runs setup: the fleet and the run.
    setup_owner: SetupOwner,
    /// The journal (its own connection: actions run concurrently): idempotency keys, and where hosts were allocated.
    journal: Option<Mutex<crate::state::journal::Journal>>,
    /// The idempotency-key scopes of what discovery saw: those creations are done and visible, so their keys
    /// are forgotten (a later creation of the same name gets a new key).
    seen: Vec<String>,
    /// The journal's run these actions belong to (recorded with what each creation made).
    run: Option<i64>,
    /// Actions answered with what an earlier run made (the same idempotency key): nothing new was made.
    reused: Mutex<std::collections::HashSet<usize>>,
    /// When each machine launched in this run was launched: `nimbus.machine.ready` says how long it took.
    launched: Mutex<HashMap<String, Instant>>,
    /// Launch → ready of the machines that became ready in this run.
    ready: Mutex<Vec<Duration>>,
}

impl Applier {
    pub fn new(desired: Desired, actual: &Actual, providers: Vec<Arc<dyn Provider>>, log_dir: Option<PathBuf>) -> Self {
        let machines = actual
            .machines
            .iter()
            .filter(|m| !m.state.is_gone())
            .filter_map(|m| {
                m.name().map(|n| {
                    (
                        n.to_string(),
                        MachineRef {
                            name: n.to_string(),
                            instance_id: Some(m.instance_id.clone()),
                            address: m.address.clone(),
                        },
                    )
                })
            })
            .collect();
        Applier {
            tenant: desired.tenant.clone(),
            providers: providers.into_iter().map(|p| (p.name().to_string(), p)).collect(),
            desired,
            machines: Mutex::new(machines),
            log_dir,
            forge: None,
            runner_dir: None,
            setup_owner: SetupOwner::default(),
            journal: None,
            seen: actual
                .machines
                .iter()
                .filter_map(|m| m.name().map(|n| format!("{}|RunInstances|{n}", m.provider)))
                .chain(actual.hosts.iter().filter_map(|h| {
                    h.tags.get(crate::core::names::tags::MACHINE).map(|n| format!("{}|AllocateHosts|{n}", h.provider))
                }))
                .collect(),
            run: None,
            reused: Mutex::new(std::collections::HashSet::new()),
            launched: Mutex::new(HashMap::new()),
            ready: Mutex::new(Vec::new()),
        }
    }

    /// Records what the call under `scope` (action `id`) made; notes when it is what an earlier run made.
    fn made(&self, id: usize, scope: &str, earlier: Option<String>, made: &str) {
        if earlier.as_deref() == Some(made) {
            self.reused.lock().expect("lock").insert(id);
        }
        if let Some(j) = &self.journal
            && let Err(e) = j.lock().expect("lock").key_made(scope, self.run, made)
        {
            tracing::warn!(scope, error = %e, "could not record what a call made");
        }
    }

    /// One call to a provider, with its `nimbus.cloud_provider.api_call_*` events.
    async fn api<T>(
        &self,
        provider: &str,
        operation: &str,
        machine: &str,
        call: impl std::future::Future<Output = Result<T, crate::providers::ProviderError>>,
    ) -> Result<T, crate::providers::ProviderError> {
        let per_request = self.providers.get(provider).is_some_and(|p| p.reports_requests());
        crate::util::telemetry::api_call(&self.tenant, provider, operation, machine, per_request, call).await
    }

    /// `nimbus.machine.ready` once a machine's last step is done: its runner registered, or (a pool without a
    /// runner) its setup done, or (neither) it answered. The duration is from its launch in this run.
    fn maybe_ready(&self, action: &Action, machine: &str) {
        let pool = self.pool_of(machine);
        let runner = self.forge.is_some() && pool.is_some_and(|p| p.runner.is_some());
        let setup = pool.is_some_and(|p| !p.setup.is_empty());
        let last = match &action.kind {
            ActionKind::LaunchInstance { .. } => {
                self.launched.lock().expect("lock").insert(machine.to_string(), Instant::now());
                false
            }
            ActionKind::RegisterRunner { .. } => true,
            ActionKind::RunSetup { .. } => !runner,
            ActionKind::WaitReachable { .. } => !runner && !setup,
            _ => false,
        };
        if !last {
            return;
        }
        let since = self.launched.lock().expect("lock").remove(machine);
        let took = since.map(|t| t.elapsed());
        if let Some(d) = took {
            self.ready.lock().expect("lock").push(d);
        }
        crate::util::telemetry::seed_event("nimbus.machine.ready", None, machine, took, None);
    }

    /// Launch → ready of every machine that became ready in this run (for the time-to-ready histogram).
    pub fn ready_times(&self) -> Vec<Duration> {
        self.ready.lock().expect("lock").clone()
    }

    /// What an earlier call under `scope` made, as the journal recorded it.
    fn made_before(&self, scope: &str) -> Option<String> {
        self.journal.as_ref().and_then(|j| j.lock().expect("lock").made(scope).ok().flatten())
    }

    /// Mutating provider actions take their idempotency keys from the journal at `path`, written before each
    /// call. A key lives until discovery has seen what it made (or the machine is terminated): a rerun of an
    /// interrupted apply, even one whose discovery lags behind the killed run's writes, sends the same keys.
    pub fn with_idempotency_keys(
        mut self,
        path: &std::path::Path,
    ) -> Result<Self, crate::state::journal::JournalError> {
        let j = crate::state::journal::Journal::open(path)?;
        for scope in &self.seen {
            j.forget_key(scope)?;
        }
        self.journal = Some(Mutex::new(j));
        Ok(self)
    }

    fn key(&self, scope: &str) -> Result<Option<String>, ActionError> {
        let Some(j) = &self.journal else { return Ok(None) };
        j.lock()
            .expect("lock")
            .idempotency_key(scope)
            .map(Some)
            .map_err(|e| ActionError::new(format!("could not record the idempotency key before the call: {e}")))
    }

    fn forget_key(&self, scope: &str) {
        if let Some(j) = &self.journal
            && let Err(e) = j.lock().expect("lock").forget_key(scope)
        {
            tracing::warn!(scope, error = %e, "could not forget a used idempotency key");
        }
    }

    /// Names who holds machines' setup locks while this applier runs setup: the fleet (its identity, the same
    /// in every clone: [`crate::engine::fleet::identity`]) and the journal's run. Under the fleet's lock, a
    /// setup lock the same fleet's dead run left is taken over (after its step is stopped); see
    /// [`Applier::run_setup`].
    pub fn with_setup_owner(mut self, fleet: impl Into<String>, run: i64, run_started: impl Into<String>) -> Self {
        self.setup_owner = SetupOwner { fleet: fleet.into(), run, run_started: run_started.into(), who: who() };
        self.run = Some(run);
        self
    }

    /// Runner actions go to this forge; the agent is installed in `runner_dir` (`{machine}` replaced).
    pub fn with_forge(mut self, forge: Arc<dyn Forge>, runner_dir: Option<String>) -> Self {
        self.forge = Some(forge);
        self.runner_dir = runner_dir;
        self
    }

    fn forge(&self) -> Result<&Arc<dyn Forge>, ActionError> {
        self.forge.as_ref().ok_or_else(|| ActionError::new("no forge is configured"))
    }

    async fn register_runner(
        &self,
        provider: &str,
        machine: &str,
        labels: &[String],
        mode: RunnerMode,
        log: Option<&PathBuf>,
    ) -> Result<(), ActionError> {
        let forge = self.forge()?;
        let t = self.provider(provider)?.transport(&self.machine_ref(machine))?.ok_or_else(|| {
            ActionError::new(format!(
                "`{machine}` cannot be reached to install its runner: the fleet file has no `ssh:` section"
            ))
        })?;
        let pool = self.pool_of(machine);
        let (os, arch) = pool.map(|p| (p.spec.os, p.spec.arch)).unwrap_or((Os::Linux, Arch::X86_64));
        let ephemeral = mode == RunnerMode::Ephemeral;
        let registration = forge.register(machine, labels, ephemeral).await?;
        let runner_id = registration.runner_id;
        let target = AgentTarget { machine, labels, os, arch, dir: self.runner_dir.as_deref() };
        // The secret travels on stdin, never on a command line nimbus builds, and is not logged.
        let AgentInstall { script, stdin } = forge.agent().install(&target, &registration);
        let out = t.exec(&script, &stdin, log.map(|p| p.as_path())).await?;
        if out.code != 0 {
            if let Some(id) = runner_id {
                let _ = forge.delete_runner(id).await;
            }
            return Err(ActionError::exit(
                format!("installing the runner on `{machine}` failed (exit {}): {}", out.code, out.stderr_tail),
                out.code,
            ));
        }
        let mut db = match machine_db::read(t.as_ref()).await? {
            Some(db) => db,
            None => self.first_state(provider, machine),
        };
        db.runner = Some(crate::state::machine_db::RunnerRow {
            name: machine.to_string(),
            labels: labels.to_vec(),
            mode: if ephemeral { "ephemeral".into() } else { "persistent".into() },
            registered_at: crate::util::time::ts(&chrono::Utc::now()),
            runner_id: runner_id.map(|i| i as i64),
        });
        // The release the agent has now: the one nimbus installed (its marker), or unknown for one that came with
        // the image.
        match installed_agent_version(t.as_ref(), forge.agent(), &target).await {
            Some(v) => db.machine.insert(machine_db::AGENT_VERSION_KEY.into(), v),
            None => db.machine.remove(machine_db::AGENT_VERSION_KEY),
        };
        db.set_lifecycle(machine_db::Lifecycle::Running);
        machine_db::write(t.as_ref(), &db).await?;
        Ok(())
    }

    async fn restart_runner(&self, provider: &str, machine: &str, log: Option<&PathBuf>) -> Result<(), ActionError> {
        let forge = self.forge()?;
        let t = self.provider(provider)?.transport(&self.machine_ref(machine))?.ok_or_else(|| {
            ActionError::new(format!("`{machine}` cannot be reached: the fleet file has no `ssh:` section"))
        })?;
        let pool = self.pool_of(machine);
        let (os, arch) = pool.map(|p| (p.spec.os, p.spec.arch)).unwrap_or((Os::Linux, Arch::X86_64));
        let labels = pool.and_then(|p| p.runner.as_ref()).map(|r| r.labels.clone()).unwrap_or_default();
        let target = AgentTarget { machine, labels: &labels, os, arch, dir: self.runner_dir.as_deref() };
        let out = t.exec(&forge.agent().restart(&target), b"", log.map(|p| p.as_path())).await?;
        if out.code != 0 {
            return Err(ActionError::exit(
                format!("restarting the runner on `{machine}` failed (exit {}): {}", out.code, out.stderr_tail),
                out.code,
            ));
        }
        Ok(())
    }

    /// Updates an idle persistent runner's agent in place. The forge is asked again first: a runner that picked up
    /// a job since the plan was made is not touched (and the script itself stops when a job's worker runs).
    async fn update_agent(
        &self,
        provider: &str,
        machine: &str,
        to: &str,
        log: Option<&PathBuf>,
    ) -> Result<(), ActionError> {
        let forge = self.forge()?;
        let tenant = crate::core::names::parse_machine_name(machine).map(|(t, _, _)| t).unwrap_or_default();
        let busy = forge.list_runners(tenant).await?.into_iter().any(|r| r.name == machine && r.busy);
        if busy {
            return Err(ActionError::new(format!(
                "the runner of `{machine}` picked up a job since the plan was made: its agent is updated after the job (plan again)"
            )));
        }
        if forge.agent().version() != Some(to) {
            return Err(ActionError::new(format!(
                "the plan updates `{machine}`'s agent to {to}, but forge.runner_version is now {}: plan again",
                forge.agent().version().unwrap_or("unknown")
            )));
        }
        let t = self.provider(provider)?.transport(&self.machine_ref(machine))?.ok_or_else(|| {
            ActionError::new(format!("`{machine}` cannot be reached: the fleet file has no `ssh:` section"))
        })?;
        let pool = self.pool_of(machine);
        let (os, arch) = pool.map(|p| (p.spec.os, p.spec.arch)).unwrap_or((Os::Linux, Arch::X86_64));
        let labels = pool.and_then(|p| p.runner.as_ref()).map(|r| r.labels.clone()).unwrap_or_default();
        let target = AgentTarget { machine, labels: &labels, os, arch, dir: self.runner_dir.as_deref() };
        let out = t.exec(&forge.agent().update(&target), b"", log.map(|p| p.as_path())).await?;
        if out.code == crate::forges::github::agent::UPDATE_BUSY_EXIT {
            return Err(ActionError::new(format!(
                "a job is running on `{machine}`: its agent was left as it is, and is updated after the job (plan again)"
            )));
        }
        if out.code != 0 {
            return Err(ActionError::exit(
                format!("updating the runner agent on `{machine}` failed (exit {}): {}", out.code, out.stderr_tail),
                out.code,
            ));
        }
        let mut db = match machine_db::read(t.as_ref()).await? {
            Some(db) => db,
            None => self.first_state(provider, machine),
        };
        match installed_agent_version(t.as_ref(), forge.agent(), &target).await {
            Some(v) => db.machine.insert(machine_db::AGENT_VERSION_KEY.into(), v),
            None => db.machine.remove(machine_db::AGENT_VERSION_KEY),
        };
        machine_db::write(t.as_ref(), &db).await?;
        Ok(())
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, ActionError> {
        self.providers.get(name).ok_or_else(|| ActionError::new(format!("provider `{name}` is not configured")))
    }

    fn machine_ref(&self, name: &str) -> MachineRef {
        self.machines
            .lock()
            .expect("lock")
            .get(name)
            .cloned()
            .unwrap_or_else(|| MachineRef { name: name.to_string(), ..MachineRef::default() })
    }

    fn pool_of(&self, machine: &str) -> Option<&crate::core::model::DesiredPool> {
        let (_, pool, _) = parse_machine_name(machine)?;
        self.desired.pools.iter().find(|p| p.name == pool)
    }

    async fn wait_reachable(&self, provider: &str, machine: &str) -> Result<(), ActionError> {
        let p = self.provider(provider)?;
        let r = self.machine_ref(machine);
        self.api(provider, "wait_running", machine, p.wait_running(&r)).await?;
        let Some(t) = p.transport(&r)? else {
            return Ok(()); // this fleet does not reach machines (no `ssh:`)
        };
        let deadline = Instant::now() + p.reachable_timeout();
        let mut delay = Duration::from_millis(100);
        loop {
            match t.probe().await {
                Ok(()) => break,
                Err(e) if Instant::now() + delay > deadline => {
                    return Err(ActionError::new(format!("`{machine}` did not become reachable: {e}")));
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        // A pool with setup steps records the machine with its first step; otherwise record it now.
        let has_setup = self.pool_of(machine).is_some_and(|p| !p.setup.is_empty());
        if !has_setup && machine_db::read(t.as_ref()).await?.is_none() {
            let mut db = self.first_state(provider, machine);
            db.set_lifecycle(machine_db::Lifecycle::Ready);
            machine_db::write(t.as_ref(), &db).await?;
        }
        Ok(())
    }

    /// The state a machine starts with: who it is, and its image.
    fn first_state(&self, provider: &str, machine: &str) -> StateDb {
        {
            let mut db = StateDb::default();
            let (_, pool, _) = parse_machine_name(machine).unwrap_or(("", "", 0));
            for (k, v) in [
                ("machine", machine),
                ("tenant", self.tenant.as_str()),
                ("pool", pool),
                ("provider", provider),
                ("nimbus_version", env!("CARGO_PKG_VERSION")),
            ] {
                db.machine.insert(k.into(), v.into());
            }
            db.machine.insert("created_at".into(), crate::util::time::ts(&chrono::Utc::now()));
            db.set_lifecycle(machine_db::Lifecycle::Provisioning);
            if let Some(p) = self.pool_of(machine) {
                db.images.push((p.spec.image.clone(), crate::util::time::ts(&chrono::Utc::now())));
            }
            db
        }
    }

    /// Takes `machine`'s setup lock (a folder beside its state database, holding a record of who took it).
    ///
    /// # Guarantees
    /// - A lock held by another fleet, or by a live run of this one, is respected (until it is older than
    ///   `stale_after`: then its apply died long ago).
    /// - A lock this fleet's own dead run left (the journal shows that run ended, was interrupted, or never got
    ///   recorded, and this applier holds the fleet's lock) is taken over at once, after the step it was
    ///   running is stopped on the machine (its process group: TERM, then KILL after a grace). The journal
    ///   records that.
    ///
    /// # Errors
    /// "another apply is running setup", naming the fleet, run, process and since when (a time, and how long ago).
    ///
    /// Taken at once (the common case), the same shell also reads the state database: the read's output is
    /// returned (see [`machine_db::parse_read`]); after a takeover, `None` (read it then).
    async fn take_setup_lock(
        &self,
        t: &dyn Transport,
        machine: &str,
        stale_after: Duration,
    ) -> Result<Option<crate::transport::ExecOutput>, ActionError> {
        let now = chrono::Utc::now();
        let locate = machine_db::locate(t.state_path());
        let me = &self.setup_owner;
        let record = format!(
            "fleet={}\nrun={} {}\nwho={}\nsince={}\n",
            me.fleet,
            me.run,
            me.run_started,
            me.who,
            now.timestamp()
        );
        // A sandbox on this computer: the same lock, taken with file operations (no process spawned).
        if let Some(db) = t.local_path(t.state_path())
            && let Some(d) = db.parent()
        {
            let l = d.join(SETUP_LOCK);
            let taken = std::fs::create_dir_all(d).and_then(|()| std::fs::create_dir(&l));
            if taken.is_ok() && std::fs::write(l.join("holder"), &record).is_ok() {
                return Ok(Some(machine_db::read_local(&db)));
            }
            // Held already (or odd): the shell below says by whom, and takes over a dead run's lock.
        }
        // Without sudo, the holder record is written by the shell itself (no `tee`): fewer processes per machine.
        let take = format!(
            "{locate}; l=\"$d/.setup.lock\"; [ -d \"$d\" ] || $s mkdir -p \"$d\"\n\
             if $s mkdir \"$l\" 2>/dev/null; then \
             if [ -z \"$s\" ]; then printf '%s' {rec} > \"$l/holder\"; else printf '%s' {rec} | $s tee \"$l/holder\" >/dev/null; fi; \
             {read}; exit $?; fi\n\
             cat \"$l/holder\" 2>/dev/null; exit 75\n",
            rec = shell::quote(&record),
            read = machine_db::read_script(),
        );
        let out = t.exec(&take, b"", None).await?;
        if out.code != 75 {
            return Ok(Some(out));
        }
        let seen = String::from_utf8_lossy(&out.stdout).to_string();
        let holder = SetupHolder::parse(&seen);
        let ours = holder.fleet.as_deref() == Some(me.fleet.as_str()) && !me.fleet.is_empty();
        let same_run = ours && holder.run == Some((me.run, me.run_started.clone()));
        let dead_run = ours && !same_run && self.run_is_over(holder.run.as_ref());
        let stale = holder.since.is_some_and(|s| now.timestamp() - s > stale_after.as_secs() as i64);
        if !(same_run || dead_run || stale) {
            return Err(ActionError::new(format!(
                "another apply is running setup on `{machine}` (lock held by {}); it is left alone: run `nimbus apply` again once it is done",
                holder.describe(now)
            )));
        }
        if dead_run || stale {
            // Its step may still run on the machine (a killed apply's shell lives on): stop it first.
            let stopped = self.stop_recorded_step(t).await;
            let why = if dead_run { "a dead run of this fleet" } else { "an apply that stopped long ago" };
            let message = format!(
                "took over the setup lock on `{machine}` from {why} ({}); its setup step: {stopped}",
                holder.describe(now)
            );
            tracing::warn!(event = "nimbus.setup.lock_taken_over", machine, "{message}");
            if let Some(j) = &self.journal {
                let _ = j.lock().expect("lock").event(
                    (me.run > 0).then_some(me.run),
                    crate::state::journal::Category::System,
                    "warn",
                    "nimbus",
                    &message,
                    Some(serde_json::json!({
                        "event": "nimbus.setup.lock_taken_over",
                        "machine": machine,
                        "holder_fleet": holder.fleet,
                        "holder_run": holder.run.as_ref().map(|r| r.0),
                        "holder": holder.who,
                        "step": stopped,
                    })),
                );
            }
        }
        // Take it over only if it is still the lock we read (another fleet may have taken it meanwhile).
        let again = format!(
            "{locate}; l=\"$d/.setup.lock\"\n\
             if [ \"$(cat \"$l/holder\" 2>/dev/null)\" = {seen} ]; then $s rm -rf \"$l\"; fi\n\
             if $s mkdir \"$l\" 2>/dev/null; then printf '%s' {rec} | $s tee \"$l/holder\" >/dev/null; exit 0; fi\n\
             cat \"$l/holder\" 2>/dev/null; exit 75\n",
            seen = shell::quote(seen.trim_end_matches('\n')),
            rec = shell::quote(&record),
        );
        let out = t.exec(&again, b"", None).await?;
        if out.code != 0 {
            let holder = SetupHolder::parse(&String::from_utf8_lossy(&out.stdout));
            return Err(ActionError::new(format!(
                "another apply is running setup on `{machine}` (lock held by {}); it is left alone: run `nimbus apply` again once it is done",
                holder.describe(now)
            )));
        }
        Ok(None)
    }

    /// Whether the journal shows `run` over: finished, interrupted, or not there at all (a run killed before its
    /// record reached the shared journal, or one pruned long ago). Only meaningful under the fleet's lock (no
    /// other run of the fleet can be running then); a run still RUNNING with the same start is respected.
    fn run_is_over(&self, run: Option<&(i64, String)>) -> bool {
        let Some((id, started)) = run else { return false };
        let Some(j) = &self.journal else { return false };
        match j.lock().expect("lock").run_status(*id) {
            Ok(Some((status, at))) => status != "RUNNING" || &at != started,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Stops the process group a setup step recorded beside the state database, if it is alive: TERM, then KILL
    /// after a grace. Says what it found and did.
    async fn stop_recorded_step(&self, t: &dyn Transport) -> String {
        let locate = machine_db::locate(t.state_path());
        let grace = STEP_STOP_GRACE.as_secs();
        let script = format!(
            "{locate}; f=\"$d/.setup-step.pid\"; [ -f \"$f\" ] || {{ echo 'none was running'; exit 0; }}\n\
             g=$(cat \"$f\"); case \"$g\" in ''|*[!0-9]*) echo 'its record is not a process group'; $s rm -f \"$f\"; exit 0;; esac\n\
             if ! kill -s 0 -- \"-$g\" 2>/dev/null; then echo \"process group $g had ended\"; $s rm -f \"$f\"; exit 0; fi\n\
             kill -s TERM -- \"-$g\" 2>/dev/null; i=0\n\
             while kill -s 0 -- \"-$g\" 2>/dev/null && [ $i -lt {grace} ]; do sleep 1; i=$((i+1)); done\n\
             if kill -s 0 -- \"-$g\" 2>/dev/null; then kill -s KILL -- \"-$g\" 2>/dev/null; echo \"process group $g was stopped with KILL after {grace}s\"; \
             else echo \"process group $g was stopped with TERM\"; fi\n\
             $s rm -f \"$f\"\n"
        );
        match t.exec(&script, b"", None).await {
            Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            Err(e) => format!("could not be checked ({e})"),
        }
    }

    /// Records `stopping` in the machine's database before it is terminated: best effort, briefly (a machine
    /// being removed may well be unreachable).
    async fn note_stopping(&self, p: &dyn Provider, r: &MachineRef) {
        let Ok(Some(t)) = p.transport(r) else { return };
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if let Ok(Some(mut db)) = machine_db::read(t.as_ref()).await {
                db.set_lifecycle(machine_db::Lifecycle::Stopping);
                let _ = machine_db::write(t.as_ref(), &db).await;
            }
        })
        .await;
    }

    /// Runs setup steps under the machine's setup lock: two applies (two operators, two CI jobs) never run
    /// setup on one machine at once.
    async fn run_setup(
        &self,
        provider: &str,
        pool: &str,
        machine: &str,
        steps: &[crate::core::plan::StepRef],
        log: Option<&PathBuf>,
    ) -> Result<(), ActionError> {
        let t: Arc<dyn Transport> =
            self.provider(provider)?.transport(&self.machine_ref(machine))?.ok_or_else(|| {
                ActionError::new(format!(
                    "`{machine}` cannot be reached to run setup: the fleet file has no `ssh:` section"
                ))
            })?;
        // A lock older than every step's timeout (plus a margin) belongs to an apply that died.
        let stale_after =
            self.pool_of(machine).map(|p| p.setup.iter().map(|s| s.timeout).sum::<Duration>()).unwrap_or_default()
                + Duration::from_secs(600);
        let read = self.take_setup_lock(t.as_ref(), machine, stale_after).await?;
        let result = async {
            let found = match read {
                Some(out) => machine_db::parse_read(t.as_ref(), out)?,
                None => machine_db::read(t.as_ref()).await?,
            };
            let db = found.unwrap_or_else(|| self.first_state(provider, machine));
            self.run_setup_locked(&t, pool, machine, steps, log, db).await
        }
        .await;
        // On success the last write released the lock; otherwise release it here.
        if result.is_err() {
            release_setup_lock(t.as_ref()).await;
        }
        result
    }

    async fn run_setup_locked(
        &self,
        t: &Arc<dyn Transport>,
        pool: &str,
        machine: &str,
        steps: &[crate::core::plan::StepRef],
        log: Option<&PathBuf>,
        mut db: StateDb,
    ) -> Result<(), ActionError> {
        let t = t.clone();
        let pool_spec = self
            .desired
            .pools
            .iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| ActionError::new(format!("pool `{pool}` is not in the fleet file")))?;
        db.set_lifecycle(machine_db::Lifecycle::ImageInstalling);
        for step in steps {
            let (position, spec) =
                pool_spec.setup.iter().enumerate().find(|(_, s)| s.name == step.name).ok_or_else(|| {
                    ActionError::new(format!("setup step `{}` is no longer in pool `{pool}`", step.name))
                })?;
            if spec.hash != step.hash {
                return Err(ActionError::new(format!(
                    "setup step `{}` changed since the plan was made; plan again",
                    step.name
                )));
            }
            let started = Instant::now();
            emit("nimbus.setup.step_start", &self.tenant, machine, None, None);
            // Recorded as running (and the step before as done) by the same shell that runs it, below.
            db.set_step(position as i64, &spec.name, &spec.hash, StepStatus::Running, None);
            if let Some(path) = log {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                    let _ = writeln!(f, "==> step {} ({})", spec.name, spec.hash);
                }
            }
            let script = format!(
                "{}{}",
                shell::exports(&[
                    ("NIMBUS_TENANT", &self.tenant),
                    ("NIMBUS_POOL", pool),
                    ("NIMBUS_MACHINE", machine),
                    ("NIMBUS_STEP", &spec.name),
                ]),
                spec.run
            );
            // The step's shell records its process group, so a step past its timeout can be killed whole.
            let locate = machine_db::locate(t.state_path());
            let script = match machine_db::local_dir(t.as_ref()) {
                // A sandbox here: its state folder is known, so the shell writes the pid itself (no subshell, no
                // variable).
                Some(d) => {
                    format!("echo $$ > {}\n{script}", shell::quote(&d.join(".setup-step.pid").to_string_lossy()))
                }
                // In a subshell, so the step's own shell sees none of nimbus's variables (`$$` is still the step's).
                None => format!(
                    "( {locate}; if [ -z \"$s\" ]; then echo $$ > \"$d/.setup-step.pid\"; else echo $$ | $s tee \"$d/.setup-step.pid\" >/dev/null; fi )\n{script}"
                ),
            };
            let run = machine_db::write_then(t.as_ref(), &db, &script, log.map(|p| p.as_path()));
            let out = match tokio::time::timeout(spec.timeout, run).await {
                Ok(out) => out?,
                Err(_) => {
                    let kill = format!(
                        "{locate}; f=\"$d/.setup-step.pid\"; if [ -f \"$f\" ]; then g=$(cat \"$f\"); kill -s TERM -- \"-$g\" 2>/dev/null; sleep 2; kill -s KILL -- \"-$g\" 2>/dev/null; $s rm -f \"$f\"; fi; exit 0"
                    );
                    let _ = t.exec(&kill, b"", None).await;
                    db.set_step(position as i64, &spec.name, &spec.hash, StepStatus::TimedOut, Some(124));
                    let msg = format!(
                        "setup step `{}` ran past its timeout of {} and was stopped",
                        spec.name,
                        humantime::format_duration(spec.timeout)
                    );
                    db.set_step_error(&spec.name, &msg);
                    machine_db::write(t.as_ref(), &db).await?;
                    emit("nimbus.setup.step_timeout", &self.tenant, machine, Some(started.elapsed()), Some(&msg));
                    return Err(ActionError::timed_out(msg));
                }
            };
            let ok = out.code == 0;
            db.set_step(
                position as i64,
                &spec.name,
                &spec.hash,
                if ok { StepStatus::Done } else { StepStatus::Failed },
                Some(i64::from(out.code)),
            );
            if !ok {
                db.set_step_error(&spec.name, &out.stderr_tail);
                machine_db::write(t.as_ref(), &db).await?;
            }
            if !ok {
                let msg = format!("setup step `{}` failed with exit code {}: {}", spec.name, out.code, out.stderr_tail);
                emit("nimbus.setup.step_failed", &self.tenant, machine, Some(started.elapsed()), Some(&msg));
                return Err(ActionError::exit(msg, out.code));
            }
            emit("nimbus.setup.step_complete", &self.tenant, machine, Some(started.elapsed()), None);
        }
        db.set_lifecycle(if db.runner.is_some() {
            machine_db::Lifecycle::Running
        } else {
            machine_db::Lifecycle::Ready
        });
        // The last step's record, the machine's new lifecycle, and the lock released: one shell (over SSH), or
        // file operations (a sandbox here).
        if machine_db::local_dir(t.as_ref()).is_some() {
            machine_db::write(t.as_ref(), &db).await?;
            release_setup_lock(t.as_ref()).await;
        } else {
            let unlock = format!("{}; {UNLOCK_SETUP}", machine_db::locate(t.state_path()));
            machine_db::write_then(t.as_ref(), &db, &unlock, None).await?;
        }
        Ok(())
    }

    async fn run_inner(&self, id: usize, action: &Action, outputs: &Outputs) -> Result<(), ActionError> {
        match &action.kind {
            ActionKind::AllocateHost {
                provider,
                pool,
                machine,
                instance_type,
                availability_zone,
                fallback_zones,
                exclude_hosts,
            } => {
                let scope = format!("{provider}|AllocateHosts|{machine}");
                let idempotency_key = self.key(&scope)?;
                let earlier = self.made_before(&scope);
                let p = self.provider(provider)?;
                let request = HostRequest {
                    tenant: self.tenant.clone(),
                    pool: pool.clone(),
                    machine: machine.clone(),
                    instance_type: instance_type.clone(),
                    availability_zone: availability_zone.clone(),
                    fallback_zones: fallback_zones.clone(),
                    exclude_hosts: exclude_hosts.clone(),
                    idempotency_key,
                    tags: self
                        .desired
                        .pools
                        .iter()
                        .find(|p| &p.name == pool)
                        .map(|p| p.spec.tags.clone())
                        .unwrap_or_default(),
                };
                let host = self.api(provider, "allocate_host", machine, p.allocate_host_in_zone(&request)).await?;
                // The journal records which of the pool's zones the host is in.
                if let Some(j) = &self.journal {
                    let zone = &host.availability_zone;
                    let recorded = j.lock().expect("lock").event(
                        None,
                        crate::state::journal::Category::Audit,
                        "info",
                        "nimbus",
                        &format!("host `{}` for `{machine}` is in {zone}", host.host_id),
                        Some(serde_json::json!({
                            "event": "nimbus.host.allocated",
                            "provider": provider,
                            "machine": machine,
                            "host_id": host.host_id,
                            "availability_zone": zone,
                            "fallback": zone != availability_zone,
                        })),
                    );
                    if let Err(e) = recorded {
                        return Err(ActionError::new(format!(
                            "allocated host `{}`, but could not record it in the journal: {e}",
                            host.host_id
                        )));
                    }
                }
                self.made(id, &scope, earlier, &host.host_id);
                outputs.lock().expect("lock").insert(id, host.host_id);
                Ok(())
            }
            ActionKind::LaunchInstance { provider, pool, machine, spec, host } => {
                let host_id = match host {
                    None => None,
                    Some(HostRef::Existing { host_id }) => Some(host_id.clone()),
                    Some(HostRef::Allocated { action }) => Some(
                        outputs
                            .lock()
                            .expect("lock")
                            .get(action)
                            .cloned()
                            .ok_or_else(|| ActionError::new("the host allocation left no host id"))?,
                    ),
                };
                let scope = format!("{provider}|RunInstances|{machine}");
                let idempotency_key = self.key(&scope)?;
                let earlier = self.made_before(&scope);
                let p = self.provider(provider)?;
                let request = LaunchRequest {
                    tenant: self.tenant.clone(),
                    pool: pool.clone(),
                    machine: machine.clone(),
                    spec: spec.clone(),
                    host_id,
                    idempotency_key,
                };
                let instance = self.api(provider, "launch", machine, p.launch(&request)).await?;
                self.made(id, &scope, earlier, &instance);
                self.machines.lock().expect("lock").insert(
                    machine.clone(),
                    MachineRef { name: machine.clone(), instance_id: Some(instance), address: None },
                );
                Ok(())
            }
            ActionKind::WaitReachable { provider, machine } => self.wait_reachable(provider, machine).await,
            ActionKind::ReimageMachine { provider, machine, instance_id, image } => {
                let mut r = self.machine_ref(machine);
                r.instance_id = Some(instance_id.clone());
                let p = self.provider(provider)?;
                self.api(provider, "reimage", machine, p.reimage(&r, image)).await?;
                // A fresh root file system means fresh SSH host keys: trust the machine's new key on first use.
                if let Some(t) = p.transport(&r)? {
                    t.forget_identity().await?;
                }
                Ok(())
            }
            ActionKind::RestartRunner { provider, machine } => {
                let log = self.log_path(id, action);
                self.restart_runner(provider, machine, log.as_ref()).await
            }
            ActionKind::UpdateTags { provider, machine, instance_id, host_id, set, remove } => {
                let mut r = self.machine_ref(machine);
                r.instance_id = Some(instance_id.clone());
                let p = self.provider(provider)?;
                Ok(self
                    .api(provider, "update_tags", machine, p.update_tags(&r, host_id.as_deref(), set, remove))
                    .await?)
            }
            ActionKind::UpdateRunnerAgent { provider, machine, to, .. } => {
                let log = self.log_path(id, action);
                self.update_agent(provider, machine, to, log.as_ref()).await
            }
            ActionKind::RepairState { provider, machine } => {
                let t = self.provider(provider)?.transport(&self.machine_ref(machine))?.ok_or_else(|| {
                    ActionError::new(format!("`{machine}` cannot be reached: the fleet file has no `ssh:` section"))
                })?;
                Ok(machine_db::write(t.as_ref(), &self.first_state(provider, machine)).await?)
            }
            ActionKind::RunSetup { provider, pool, machine, steps } => {
                let log = self.log_path(id, action);
                self.run_setup(provider, pool, machine, steps, log.as_ref()).await
            }
            ActionKind::RegisterRunner { provider, machine, labels, mode, .. } => {
                let log = self.log_path(id, action);
                self.register_runner(provider, machine, labels, *mode, log.as_ref()).await
            }
            ActionKind::UpdateRunnerLabels { runner_id, labels, .. } => {
                Ok(self.forge()?.set_labels(*runner_id, labels).await?)
            }
            ActionKind::DeregisterRunner { runner_id, runner_name } => {
                match self.forge()?.delete_runner(*runner_id).await {
                    // The runner picked up a job since the plan was made: the forge refuses, and the removal waits.
                    Err(crate::forges::ForgeError::Conflict(why)) => Err(ActionError::deferred(format!(
                        "`{runner_name}` is running a job ({why}); its removal waits for the job to finish"
                    ))),
                    other => Ok(other?),
                }
            }
            ActionKind::TerminateInstance { provider, machine, instance_id } => {
                let mut r = self.machine_ref(machine);
                r.instance_id = Some(instance_id.clone());
                let p = self.provider(provider)?;
                self.note_stopping(p.as_ref(), &r).await;
                self.api(provider, "terminate", machine, p.terminate(&r)).await?;
                // Its connection (if one is open) goes with it.
                if let Ok(Some(t)) = p.transport(&r) {
                    t.close().await;
                }
                // A machine of this name created later is a new one: it gets a new key.
                self.forget_key(&format!("{provider}|RunInstances|{machine}"));
                Ok(())
            }
            ActionKind::ReleaseHost { provider, host_id } => {
                let p = self.provider(provider)?;
                Ok(self.api(provider, "release_host", "", p.release_host(host_id)).await?)
            }
        }
    }
}

#[async_trait]
impl ActionRunner for Applier {
    async fn run(&self, id: usize, action: &Action, outputs: &Outputs) -> Result<(), ActionError> {
        let (start, done, failed) = event_names(&action.kind);
        let aliases = event_aliases(&action.kind);
        let alias = |name: &str, old: &'static str| (name != old).then_some(old);
        let machine = action.kind.machine().unwrap_or(&action.address).to_string();
        let span = tracing::info_span!("nimbus.action", id, kind = action.kind.name(), address = %action.address, tenant = %self.tenant);
        async {
            use crate::util::telemetry::seed_event;
            seed_event(start, alias(start, aliases.0), &machine, None, None);
            let t = Instant::now();
            let r = self.run_inner(id, action, outputs).await;
            match &r {
                Ok(()) => {
                    seed_event(done, alias(done, aliases.1), &machine, Some(t.elapsed()), None);
                    self.maybe_ready(action, &machine);
                }
                Err(e) => seed_event(failed, alias(failed, aliases.2), &machine, Some(t.elapsed()), Some(&e.message)),
            }
            r
        }
        .instrument(span)
        .await
    }

    fn made_nothing_new(&self) -> std::collections::HashSet<usize> {
        self.reused.lock().expect("lock").clone()
    }

    fn log_path(&self, id: usize, action: &Action) -> Option<PathBuf> {
        match action.kind {
            ActionKind::RunSetup { .. }
            | ActionKind::RegisterRunner { .. }
            | ActionKind::RestartRunner { .. }
            | ActionKind::UpdateRunnerAgent { .. } => {
                self.log_dir.as_ref().map(|d| d.join(format!("{id:04}-{}.log", action.kind.name())))
            }
            _ => None,
        }
    }
}

/// The agent release installed on the machine, as its marker says (`None`: unknown).
async fn installed_agent_version(
    t: &dyn crate::transport::Transport,
    agent: &dyn crate::forges::RunnerAgent,
    target: &AgentTarget<'_>,
) -> Option<String> {
    let out = t.exec(&agent.installed_version(target), b"", None).await.ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.code == 0 && !v.is_empty() && v.len() <= 64).then_some(v)
}
