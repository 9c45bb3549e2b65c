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

/// Telemetry event names, per action kind: (start, success, failure).
pub fn event_names(kind: &ActionKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        ActionKind::AllocateHost { .. } => {
            ("nimbus.host.allocate_start", "nimbus.host.allocated", "nimbus.host.allocate_failed")
        }
        ActionKind::RestartRunner { .. } => {
            ("nimbus.runner.restart_start", "nimbus.runner.restarted", "nimbus.runner.restart_failed")
        }
        ActionKind::ReimageMachine { .. } => {
            ("nimbus.machine.reimage_start", "nimbus.machine.reimaged", "nimbus.machine.reimage_failed")
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

fn emit(event: &str, tenant: &str, machine: &str, duration: Option<Duration>, error: Option<&str>) {
    let duration_ms = duration.map(|d| d.as_millis() as u64);
    match error {
        None => tracing::info!(event, tenant, machine, duration_ms, "{event}"),
        Some(error) => tracing::warn!(event, tenant, machine, duration_ms, error, "{event}"),
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
    /// Who holds a machine's setup lock while this applier runs setup (`host:journal`).
    lock_owner: String,
    /// The journal (its own connection: actions run concurrently): idempotency keys, and where hosts were allocated.
    journal: Option<Mutex<crate::state::journal::Journal>>,
    /// The idempotency-key scopes of what discovery saw: those creations are done and visible, so their keys
    /// are forgotten (a later creation of the same name gets a new key).
    seen: Vec<String>,
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
            lock_owner: format!("{} pid {}", super::apply::hostname().unwrap_or_default(), std::process::id()),
            journal: None,
            seen: actual
                .machines
                .iter()
                .filter_map(|m| m.name().map(|n| format!("{}|RunInstances|{n}", m.provider)))
                .chain(actual.hosts.iter().filter_map(|h| {
                    h.tags.get(crate::core::names::tags::MACHINE).map(|n| format!("{}|AllocateHosts|{n}", h.provider))
                }))
                .collect(),
        }
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

    /// Names who holds machines' setup locks while this applier runs setup. An apply that died leaves its lock
    /// behind; the next apply with the same owner takes it back at once.
    pub fn with_lock_owner(mut self, owner: impl Into<String>) -> Self {
        self.lock_owner = owner.into();
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
        p.wait_running(&r).await?;
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
            machine_db::write(t.as_ref(), &self.first_state(provider, machine)).await?;
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
            if let Some(p) = self.pool_of(machine) {
                db.images.push((p.spec.image.clone(), crate::util::time::ts(&chrono::Utc::now())));
            }
            db
        }
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
        let now = chrono::Utc::now().timestamp();
        let locate = machine_db::locate(t.state_path());
        let lock = format!(
            "{locate}; l=\"$d/.setup.lock\"; [ -d \"$d\" ] || $s mkdir -p \"$d\"\n\
             take() {{ $s mkdir \"$l\" 2>/dev/null && printf '%s\\n%s\\n' {owner} {now} | $s tee \"$l/holder\" >/dev/null; }}\n\
             if take; then exit 0; fi\n\
             who=$(sed -n 1p \"$l/holder\" 2>/dev/null); since=$(sed -n 2p \"$l/holder\" 2>/dev/null)\n\
             if [ \"$who\" = {owner} ] || {{ [ -n \"$since\" ] && [ $(({now} - since)) -gt {stale} ]; }}; then $s rm -rf \"$l\"; take && exit 0; fi\n\
             printf '%s since %s' \"$who\" \"$since\"; exit 75\n",
            owner = shell::quote(&self.lock_owner),
            stale = stale_after.as_secs(),
        );
        let out = t.exec(&lock, b"", None).await?;
        if out.code != 0 {
            let held = String::from_utf8_lossy(&out.stdout).to_string();
            return Err(ActionError::new(format!(
                "another apply is running setup on `{machine}` (lock held by {held}); it is left alone: run `nimbus apply` again once it is done"
            )));
        }
        let result = self.run_setup_locked(&t, provider, pool, machine, steps, log).await;
        let _ = t.exec(&format!("{locate}; $s rm -rf \"$d/.setup.lock\""), b"", None).await;
        result
    }

    async fn run_setup_locked(
        &self,
        t: &Arc<dyn Transport>,
        provider: &str,
        pool: &str,
        machine: &str,
        steps: &[crate::core::plan::StepRef],
        log: Option<&PathBuf>,
    ) -> Result<(), ActionError> {
        let t = t.clone();
        let pool_spec = self
            .desired
            .pools
            .iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| ActionError::new(format!("pool `{pool}` is not in the fleet file")))?;
        let mut db = match machine_db::read(t.as_ref()).await? {
            Some(db) => db,
            None => self.first_state(provider, machine),
        };
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
            db.set_step(position as i64, &spec.name, &spec.hash, StepStatus::Running, None);
            machine_db::write(t.as_ref(), &db).await?;
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
            // In a subshell, so the step's own shell sees none of nimbus's variables (`$$` is still the step's).
            let script = format!("( {locate}; echo $$ | $s tee \"$d/.setup-step.pid\" >/dev/null )\n{script}");
            let out = match tokio::time::timeout(spec.timeout, t.exec(&script, b"", log.map(|p| p.as_path()))).await {
                Ok(out) => out?,
                Err(_) => {
                    let kill = format!(
                        "{locate}; f=\"$d/.setup-step.pid\"; if [ -f \"$f\" ]; then g=$(cat \"$f\"); kill -s TERM -- \"-$g\" 2>/dev/null; sleep 2; kill -s KILL -- \"-$g\" 2>/dev/null; $s rm -f \"$f\"; fi; exit 0"
                    );
                    let _ = t.exec(&kill, b"", None).await;
                    db.set_step(position as i64, &spec.name, &spec.hash, StepStatus::TimedOut, Some(124));
                    machine_db::write(t.as_ref(), &db).await?;
                    let msg = format!(
                        "setup step `{}` ran past its timeout of {} and was stopped",
                        spec.name,
                        humantime::format_duration(spec.timeout)
                    );
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
            machine_db::write(t.as_ref(), &db).await?;
            if !ok {
                let msg = format!("setup step `{}` failed with exit code {}: {}", spec.name, out.code, out.stderr_tail);
                emit("nimbus.setup.step_failed", &self.tenant, machine, Some(started.elapsed()), Some(&msg));
                return Err(ActionError::exit(msg, out.code));
            }
            emit("nimbus.setup.step_complete", &self.tenant, machine, Some(started.elapsed()), None);
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
                let idempotency_key = self.key(&format!("{provider}|AllocateHosts|{machine}"))?;
                let host = self
                    .provider(provider)?
                    .allocate_host_in_zone(&HostRequest {
                        tenant: self.tenant.clone(),
                        pool: pool.clone(),
                        machine: machine.clone(),
                        instance_type: instance_type.clone(),
                        availability_zone: availability_zone.clone(),
                        fallback_zones: fallback_zones.clone(),
                        exclude_hosts: exclude_hosts.clone(),
                        idempotency_key,
                    })
                    .await?;
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
                let idempotency_key = self.key(&format!("{provider}|RunInstances|{machine}"))?;
                let instance = self
                    .provider(provider)?
                    .launch(&LaunchRequest {
                        tenant: self.tenant.clone(),
                        pool: pool.clone(),
                        machine: machine.clone(),
                        spec: spec.clone(),
                        host_id,
                        idempotency_key,
                    })
                    .await?;
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
                p.reimage(&r, image).await?;
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
                p.terminate(&r).await?;
                // Its connection (if one is open) goes with it.
                if let Ok(Some(t)) = p.transport(&r) {
                    t.close().await;
                }
                // A machine of this name created later is a new one: it gets a new key.
                self.forget_key(&format!("{provider}|RunInstances|{machine}"));
                Ok(())
            }
            ActionKind::ReleaseHost { provider, host_id } => Ok(self.provider(provider)?.release_host(host_id).await?),
        }
    }
}

#[async_trait]
impl ActionRunner for Applier {
    async fn run(&self, id: usize, action: &Action, outputs: &Outputs) -> Result<(), ActionError> {
        let (start, done, failed) = event_names(&action.kind);
        let machine = action.kind.machine().unwrap_or(&action.address).to_string();
        let span = tracing::info_span!("nimbus.action", id, kind = action.kind.name(), address = %action.address, tenant = %self.tenant);
        async {
            emit(start, &self.tenant, &machine, None, None);
            let t = Instant::now();
            let r = self.run_inner(id, action, outputs).await;
            match &r {
                Ok(()) => emit(done, &self.tenant, &machine, Some(t.elapsed()), None),
                Err(e) => emit(failed, &self.tenant, &machine, Some(t.elapsed()), Some(&e.message)),
            }
            r
        }
        .instrument(span)
        .await
    }

    fn log_path(&self, id: usize, action: &Action) -> Option<PathBuf> {
        match action.kind {
            ActionKind::RunSetup { .. } | ActionKind::RegisterRunner { .. } | ActionKind::RestartRunner { .. } => {
                self.log_dir.as_ref().map(|d| d.join(format!("{id:04}-{}.log", action.kind.name())))
            }
            _ => None,
        }
    }
}
