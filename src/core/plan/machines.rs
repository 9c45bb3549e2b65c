//! Machines: the create chain (launch → wait → setup → register), the teardown chain (deregister →
//! terminate), replacement, and in-place convergence (setup steps, runner registration and labels).

use super::attrs::{Attrs, MachineAttrs};
use super::model::*;
use super::reason::{ChangeReason, ReplaceCause, StepWhy, UpdateCause};
use super::runners::same_labels;
use super::*;
use crate::core::model::*;

impl<'a> Builder<'a> {
    pub(super) fn machine_after(&self, pool: &DesiredPool, host: Option<String>) -> MachineAttrs {
        MachineAttrs {
            pool: Some(pool.name.clone()),
            provider: pool.provider.clone(),
            instance_id: None,
            state: None,
            os: Some(pool.spec.os),
            arch: Some(pool.spec.arch),
            image: pool.spec.image.clone(),
            instance_type: pool.spec.instance_type.clone(),
            availability_zone: pool.spec.availability_zone.clone(),
            host,
            labels: if self.desired.forge { pool.runner.as_ref().map(|r| r.labels.clone()) } else { None },
            setup: Some(pool.setup.iter().map(|s| s.name.clone()).collect()),
            tags: (!pool.spec.tags.is_empty()).then(|| pool.spec.tags.clone()),
        }
    }

    pub(super) fn machine_before(&self, m: &ActualMachine) -> MachineAttrs {
        let (labels, setup) = match &m.on_machine {
            OnMachine::Read { state } => (
                state.runner.as_ref().map(|r| r.labels.clone()),
                Some(state.steps.iter().filter(|s| s.status == StepStatus::Done).map(|s| s.name.clone()).collect()),
            ),
            _ => (None, None),
        };
        let labels = m.name().and_then(|n| self.runner(n)).map(|r| r.labels.clone()).or(labels);
        MachineAttrs {
            pool: m.pool().map(str::to_string),
            provider: m.provider.to_string(),
            instance_id: Some(m.instance_id.clone()),
            state: Some(m.state),
            os: None,
            arch: None,
            image: m.image.to_string(),
            instance_type: m.instance_type.as_deref().map(str::to_string),
            availability_zone: m.availability_zone.as_deref().map(str::to_string),
            host: m.host_id.clone(),
            labels,
            setup,
            tags: Some(user_tags(&m.tags)).filter(|t| !t.is_empty()),
        }
    }

    /// Launch → wait → setup → register, after `deps`. Returns the action ids.
    pub(super) fn bring_up(
        &mut self,
        pool: &DesiredPool,
        name: &str,
        addr: &str,
        host: Option<HostRef>,
        deps: Vec<usize>,
    ) -> Vec<usize> {
        let mut ids = Vec::new();
        let mut deps = deps;
        // A machine of the same name going away (its pool moved provider) must be gone first.
        for t in self.teardowns.get(name).cloned().unwrap_or_default() {
            if !deps.contains(&t) {
                deps.push(t);
            }
        }
        let launch = self.add(
            addr,
            ActionKind::LaunchInstance {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.to_string(),
                spec: pool.spec.clone(),
                host,
            },
            &deps,
        );
        ids.push(launch);
        let wait = self.add(
            addr,
            ActionKind::WaitReachable { provider: pool.provider.clone(), machine: name.to_string() },
            &[launch],
        );
        ids.push(wait);
        let mut last = wait;
        if !pool.setup.is_empty() {
            last = self.add(
                addr,
                ActionKind::RunSetup {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.to_string(),
                    steps: pool.setup.iter().map(|s| StepRef { name: s.name.clone(), hash: s.hash.clone() }).collect(),
                },
                &[wait],
            );
            ids.push(last);
        }
        if let (Some(r), true) = (&pool.runner, self.runners.is_some()) {
            let mut deps = vec![last];
            // A stale runner of the same name must go first (unless a teardown already does that).
            if let Some(old) = self.runner(name).filter(|_| !self.runners_handled.contains(name))
                && self.must_wait_for_job(name)
            {
                // A runner of this name is running a job somewhere: registering replaces it, so wait.
                self.runners_handled.insert(name.to_string().into());
                let a = ActionKind::DeregisterRunner { runner_id: old.id, runner_name: old.name.clone() };
                self.defer_for_job(addr, name, a, "then the new machine's runner registers");
                return ids;
            }
            if let Some(old) = self.runner(name).filter(|_| !self.runners_handled.contains(name)) {
                let d = self.add(
                    addr,
                    ActionKind::DeregisterRunner { runner_id: old.id, runner_name: old.name.clone() },
                    &[],
                );
                ids.push(d);
                deps.push(d);
                self.runners_handled.insert(name.to_string().into());
            }
            ids.push(self.add(addr, register_runner(pool, name, r), &deps));
        }
        ids
    }

    pub(super) fn create(&mut self, pool: &DesiredPool, index: u32, cause: ChangeReason) {
        let name = machine_name(&self.desired.tenant, &pool.name, index);
        let addr = address(&pool.name, index);
        // A recent run made it, and the provider does not show it yet: wait for it; never make it twice.
        if let Some(u) = self.made_unseen(&pool.provider, &name) {
            let run = u.run.map(|r| format!("run {r}")).unwrap_or_else(|| "an earlier run".into());
            self.deferred.push(Deferred {
                address: addr,
                action: ActionKind::LaunchInstance {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.clone(),
                    spec: pool.spec.clone(),
                    host: None,
                },
                due_at: None,
                reason: format!(
                    "made by {run} at {} (`{}`) and not visible yet: the provider's reads lag behind its writes; the plan waits for it instead of making it again (until {})",
                    crate::util::time::ts(&u.made_at),
                    u.id,
                    crate::util::time::ts(&window_end_at(u.made_at, NOT_VISIBLE_GRACE))
                ),
                kind: DeferredKind::NotVisibleYet,
            });
            return;
        }
        // Its own host (tagged for it) is being scrubbed or settling after its last instance: wait for it rather
        // than pay for another, unless another usable host is idle or the pool says to allocate.
        if let Some(h) = self.own_host_not_ready(pool, &name)
            && !pool.allocate_on_replace
            && !self.has_usable_idle_host(pool)
        {
            let expected = self.scrub_expected(h);
            let action = ActionKind::LaunchInstance {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.clone(),
                spec: pool.spec.clone(),
                host: Some(HostRef::Existing { host_id: h.to_string() }),
            };
            self.claimed_hosts.insert(h);
            self.deferred.push(Deferred {
                address: addr,
                action,
                due_at: None,
                reason: format!(
                    "waiting for its host `{h}` to be usable after its scrub (expected by about {}); no new host is paid for",
                    crate::util::time::ts(&expected)
                ),
                kind: DeferredKind::Scrubbing,
            });
            return;
        }
        // A machine of the same name (its pool moved provider) is still running a job: this one waits for it.
        if self.held_for_jobs.contains(&name) {
            let action = ActionKind::LaunchInstance {
                provider: pool.provider.clone(),
                pool: pool.name.clone(),
                machine: name.clone(),
                spec: pool.spec.clone(),
                host: None,
            };
            self.defer_for_job(&addr, &name, action, "the new machine of the same name is made after it is removed");
            return;
        }
        if !self.budget_allows(pool, &name, &addr) {
            return;
        }
        let (host, deps, host_attr) = self.host_for(pool, &name, &addr);
        let mut ids = deps.clone();
        ids.extend(self.bring_up(pool, &name, &addr, host, deps));
        ids.sort_unstable();
        let after = Attrs::from(self.machine_after(pool, host_attr));
        let run_steps = pool.setup.iter().map(|s| s.name.clone()).collect();
        let subject = Subject::machine(addr, name, Some(&pool.name));
        self.changes.push(ResourceChange::create(subject, cause, after, run_steps, ids));
    }

    /// Deregister → terminate; returns (ids, terminate id).
    pub(super) fn tear_down(&mut self, m: &'a ActualMachine, addr: &str) -> (Vec<usize>, usize) {
        let mut ids = Vec::new();
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let mut deps = Vec::new();
        // One runner per name: of two instances of one name (copies) going away, only one deregisters it.
        if let Some(r) = self.runner(&name).filter(|_| !self.runners_handled.contains(name.as_str())) {
            let d = self.add(addr, ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() }, &[]);
            ids.push(d);
            deps.push(d);
            self.runners_handled.insert(name.clone().into());
        }
        let t = self.add(
            addr,
            ActionKind::TerminateInstance {
                provider: m.provider.to_string(),
                machine: name,
                instance_id: m.instance_id.clone(),
            },
            &deps,
        );
        ids.push(t);
        if let Some(n) = m.name() {
            self.teardowns.entry(n.to_string()).or_default().push(t);
        }
        (ids, t)
    }

    pub(super) fn destroy(&mut self, m: &'a ActualMachine, cause: ChangeReason) {
        let addr = machine_address(m);
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        if self.must_wait_for_job(&name) {
            self.hold_for_job(m, &addr, &format!("then it is removed ({cause})"));
            return;
        }
        let (mut ids, t) = self.tear_down(m, &addr);
        if let Some(h) = m.host_id.clone() {
            self.release_or_defer(&h, &[t], &mut ids);
        }
        let subject = Subject::machine(addr, m.name().unwrap_or(&m.instance_id).to_string(), m.pool());
        self.changes.push(ResourceChange::delete(subject, cause, Attrs::from(self.machine_before(m)), ids));
    }

    pub(super) fn replace(&mut self, pool: &DesiredPool, m: &'a ActualMachine, causes: Vec<ReplaceCause>) {
        let addr = machine_address(m);
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        if self.must_wait_for_job(&name) {
            let why = ChangeReason::Replace { causes };
            self.hold_for_job(m, &addr, &format!("then it is replaced ({why})"));
            return;
        }
        let (mut ids, t) = self.tear_down(m, &addr);
        // The old host still fits: once its instance ends, the host is scrubbed (unusable for 50 minutes to
        // hours on EC2). Take another idle usable host now, or (`mac_replacement: allocate`) a new one; otherwise
        // the new instance waits for the old host, and no new host is paid for.
        let fits = m.host_id.as_deref().filter(|h| {
            self.hosts.get(h).is_some_and(|h| {
                Some(&h.instance_type) == pool.spec.instance_type.as_ref()
                    && pool.spec.availability_zone.is_some()
                    && pool.spec.allows_zone(Some(&h.availability_zone))
            })
        });
        if let Some(old) = fits {
            self.claimed_hosts.insert(old);
            let old = old.to_string();
            if !pool.allocate_on_replace && !self.has_usable_idle_host(pool) {
                let expected = self.scrub_expected(&old);
                let action = ActionKind::LaunchInstance {
                    provider: pool.provider.clone(),
                    pool: pool.name.clone(),
                    machine: name.clone(),
                    spec: pool.spec.clone(),
                    host: Some(HostRef::Existing { host_id: old.clone() }),
                };
                self.deferred.push(Deferred {
                    address: addr.clone(),
                    action,
                    due_at: None,
                    reason: format!(
                        "host `{old}` is scrubbed after its instance ends; the new instance launches on it once it is usable again (expected by about {}); waiting costs no new host (`mac_replacement: allocate` would pay for at least {} more host-hours now)",
                        crate::util::time::ts(&expected),
                        self.window_hours(pool)
                    ),
                    kind: DeferredKind::Scrubbing,
                });
                ids.sort_unstable();
                let subject = Subject::machine(addr, name, Some(&pool.name));
                let cause = ChangeReason::Replace { causes };
                self.changes.push(ResourceChange::delete(subject, cause, Attrs::from(self.machine_before(m)), ids));
                return;
            }
        } else if let Some(h) = m.host_id.clone() {
            self.release_or_defer(&h, &[t], &mut ids);
        }
        let (host, mut deps, host_attr) = self.host_for(pool, &name, &addr);
        ids.extend(deps.iter().copied());
        deps.push(t);
        ids.extend(self.bring_up(pool, &name, &addr, host, deps));
        ids.sort_unstable();
        let (before, after) = (Attrs::from(self.machine_before(m)), Attrs::from(self.machine_after(pool, host_attr)));
        let run_steps = pool.setup.iter().map(|s| s.name.clone()).collect();
        let subject = Subject::machine(addr, name, Some(&pool.name));
        self.changes.push(ResourceChange::replace(subject, causes, before, after, run_steps, ids));
    }

    /// In-place changes for a kept machine: unfinished or changed setup steps, runner registration and labels.
    pub(super) fn converge(&mut self, pool: &DesiredPool, m: &'a ActualMachine) {
        // Made only when something is planned (most machines need nothing).
        let addr_cell = std::cell::OnceCell::new();
        let addr = || addr_cell.get_or_init(|| machine_address(m)).as_str();
        let name: &'a str = m.name().unwrap_or(&m.instance_id);
        let mut bad_state = None;
        let job_done = self.ephemeral_job_done(pool, m);
        let state = match (&m.on_machine, m.state) {
            // The machine is reimaged: it starts over from a fresh file system.
            _ if job_done => std::borrow::Cow::Owned(MachineState::default()),
            (OnMachine::Read { state }, _) => std::borrow::Cow::Borrowed(state),
            (OnMachine::Unreachable { reason }, _) => {
                self.warnings.push(Warning {
                    address: addr().to_string(),
                    message: format!("`{name}` is unreachable ({reason}); its setup and runner cannot be checked"),
                    kind: WarningKind::Unreachable,
                });
                return self.tags_only(pool, m, addr().to_string(), name.to_string());
            }
            // The machine answered but its state database is empty or damaged: rewrite it, then set up again.
            (OnMachine::BadState { reason }, _) => {
                bad_state = Some(reason.clone());
                std::borrow::Cow::Owned(MachineState::default())
            }
            // Launched but never set up (an apply stopped early): continue from the start.
            (OnMachine::NotRead, InstanceState::Pending) => std::borrow::Cow::Owned(MachineState::default()),
            // Nothing on the machine to check for this pool.
            (OnMachine::NotRead, _) if pool.setup.is_empty() && (pool.runner.is_none() || self.runners.is_none()) => {
                return self.tags_only(pool, m, addr().to_string(), name.to_string());
            }
            (OnMachine::NotRead, _) => {
                self.warnings.push(Warning {
                    address: addr().to_string(),
                    message: format!("the state of `{name}` was not read; its setup and runner were not checked"),
                    kind: WarningKind::Other,
                });
                return self.tags_only(pool, m, addr().to_string(), name.to_string());
            }
        };
        let mut ids = Vec::new();
        let mut why = Vec::new();
        let mut last = None;
        if m.state == InstanceState::Pending {
            let w = self.add(
                addr(),
                ActionKind::WaitReachable { provider: pool.provider.clone(), machine: name.to_string() },
                &[],
            );
            ids.push(w);
            last = Some(w);
        }
        if job_done {
            // Reimage in place (the replacement case never gets here), then wait for it, set it up and register
            // its runner again below.
            why.push(UpdateCause::Reimage);
            let deps: Vec<usize> = last.into_iter().collect();
            let r = self.add(
                addr(),
                ActionKind::ReimageMachine {
                    provider: pool.provider.clone(),
                    machine: name.to_string(),
                    instance_id: m.instance_id.clone(),
                    image: pool.spec.image.clone(),
                },
                &deps,
            );
            let w = self.add(
                addr(),
                ActionKind::WaitReachable { provider: pool.provider.clone(), machine: name.to_string() },
                &[r],
            );
            ids.extend([r, w]);
            last = Some(w);
        }
        if let Some(reason) = &bad_state {
            why.push(UpdateCause::BadState { reason: reason.clone() });
            let deps: Vec<usize> = last.into_iter().collect();
            let r = self.add(
                addr(),
                ActionKind::RepairState { provider: pool.provider.clone(), machine: name.to_string() },
                &deps,
            );
            ids.push(r);
            last = Some(r);
        }
        // Resume from the first step that is not done with the same script.
        let first_todo = pool.setup.iter().position(|s| {
            !state.steps.iter().any(|r| r.name == s.name && r.hash == s.hash && r.status == StepStatus::Done)
        });
        let mut run_steps = Vec::new();
        if let Some(i) = first_todo {
            let steps: Vec<StepRef> =
                pool.setup[i..].iter().map(|s| StepRef { name: s.name.to_string(), hash: s.hash.clone() }).collect();
            for s in &steps {
                let old = state.steps.iter().find(|r| r.name == s.name);
                let what = match old {
                    None => StepWhy::New,
                    Some(r) if r.status == StepStatus::Failed => StepWhy::FailedBefore,
                    Some(r) if r.status == StepStatus::TimedOut => StepWhy::TimedOut,
                    Some(r) if r.status == StepStatus::Running => StepWhy::Interrupted,
                    Some(r) if r.hash != s.hash => StepWhy::Changed,
                    Some(_) => StepWhy::AfterAChangedStep,
                };
                why.push(UpdateCause::Step { name: s.name.to_string(), why: what });
                run_steps.push(s.name.to_string());
            }
            let deps: Vec<usize> = last.into_iter().collect();
            let s = self.add(
                addr(),
                ActionKind::RunSetup {
                    provider: pool.provider.clone(),
                    pool: pool.name.to_string(),
                    machine: name.to_string(),
                    steps,
                },
                &deps,
            );
            ids.push(s);
            last = Some(s);
        }
        if self.runners.is_some() {
            let registered = self.runner(name);
            match (&pool.runner, registered) {
                (Some(r), None) => {
                    why.push(UpdateCause::RunnerMissing);
                    let deps: Vec<usize> = last.into_iter().collect();
                    ids.push(self.add(addr(), register_runner(pool, name, r), &deps));
                }
                (Some(r), Some(fr)) => {
                    self.runners_handled.insert(name.into());
                    let relabel = !same_labels(&r.labels, &fr.labels);
                    // New labels change which jobs the runner may take: never in the middle of one.
                    if relabel && self.must_wait_for_job(name) {
                        let a = ActionKind::UpdateRunnerLabels {
                            machine: name.to_string(),
                            runner_id: fr.id,
                            labels: r.labels.clone(),
                            previous: fr.labels.clone(),
                        };
                        self.defer_for_job(addr(), name, a, "then its labels change");
                    } else if relabel && self.desired.forge_cannot_relabel {
                        // The runner declares its labels (Forgejo, Gitea): register it again with the new ones.
                        why.push(UpdateCause::Labels);
                        let d = self.add(
                            addr(),
                            ActionKind::DeregisterRunner { runner_id: fr.id, runner_name: fr.name.to_string() },
                            &[],
                        );
                        let mut deps: Vec<usize> = last.into_iter().collect();
                        deps.push(d);
                        let reg = self.add(addr(), register_runner(pool, name, r), &deps);
                        ids.extend([d, reg]);
                        last = Some(reg);
                    } else if relabel {
                        why.push(UpdateCause::Labels);
                        ids.push(self.add(
                            addr(),
                            ActionKind::UpdateRunnerLabels {
                                machine: name.to_string(),
                                runner_id: fr.id,
                                labels: r.labels.clone(),
                                previous: fr.labels.clone(),
                            },
                            &[],
                        ));
                    }
                    // An older agent than the fleet wants is updated in place, never under a job. (An ephemeral
                    // runner gets the wanted release when it registers again after its job.)
                    let installed = state.runner.as_ref().and_then(|s| s.agent_version.as_deref());
                    if let (Some(have), Some(want)) = (installed, r.agent_version.as_deref())
                        && r.mode == crate::config::RunnerMode::Persistent
                        && crate::forges::github::agent::version_older(have, want)
                    {
                        let a = ActionKind::UpdateRunnerAgent {
                            provider: pool.provider.clone(),
                            machine: name.to_string(),
                            from: have.to_string(),
                            to: want.to_string(),
                        };
                        if fr.busy || self.busy(name) {
                            self.defer_for_job(addr(), name, a, "then its runner agent is updated");
                        } else {
                            why.push(UpdateCause::AgentVersion { from: have.to_string(), to: want.to_string() });
                            let deps: Vec<usize> = last.into_iter().collect();
                            let u = self.add(addr(), a, &deps);
                            ids.push(u);
                            last = Some(u);
                        }
                    }
                    // Offline past its grace on a machine that answers: restart its agent. (An ephemeral runner
                    // is never restarted: it is reimaged after its job.)
                    let grace = chrono::Duration::from_std(r.offline_grace).unwrap_or(chrono::Duration::MAX);
                    if let Some(since) = fr.offline_since.filter(|s| !fr.online && *s + grace <= self.now)
                        && r.mode == crate::config::RunnerMode::Persistent
                    {
                        why.push(UpdateCause::RunnerOffline { since });
                        let deps: Vec<usize> = last.into_iter().collect();
                        ids.push(self.add(
                            addr(),
                            ActionKind::RestartRunner { provider: pool.provider.clone(), machine: name.to_string() },
                            &deps,
                        ));
                    }
                }
                (None, Some(fr)) => {
                    self.runners_handled.insert(name.into());
                    let a = ActionKind::DeregisterRunner { runner_id: fr.id, runner_name: fr.name.to_string() };
                    if self.must_wait_for_job(name) {
                        self.defer_for_job(addr(), name, a, "then the runner is removed (the pool no longer has one)");
                    } else {
                        why.push(UpdateCause::RunnerRemoved);
                        ids.push(self.add(addr(), a, &[]));
                    }
                }
                (None, None) => {}
            }
        }
        if let Some((id, cause)) = self.tag_update(pool, m, name) {
            ids.push(id);
            why.push(cause);
        }
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        let mut after = self.machine_after(pool, m.host_id.clone());
        after.instance_id = Some(m.instance_id.clone());
        after.state = Some(m.state);
        let (before, after) = (Attrs::from(self.machine_before(m)), Attrs::from(after));
        let subject = Subject::machine(addr().to_string(), name.to_string(), Some(&pool.name));
        self.changes.push(ResourceChange::update(subject, why, before, after, run_steps, ids));
    }

    /// The in-place update of a machine's user tags (and its host's), when they differ from the pool's: the
    /// action and its cause. A tag change never replaces a machine, and never waits for a job.
    fn tag_update(&mut self, pool: &DesiredPool, m: &ActualMachine, name: &str) -> Option<(usize, UpdateCause)> {
        // Providers without tags (their pools' tags are empty, and so are their machines') have nothing to do.
        let want = &pool.spec.tags;
        let host = m.host_id.as_deref().and_then(|h| self.hosts.get(h).copied());
        // The common case, without allocating: no tags wanted, and none of the user's on the machine or its host.
        let untagged = |t: &Tags| t.keys().all(is_reserved_tag);
        if want.is_empty() && untagged(&m.tags) && host.is_none_or(|h| untagged(&h.tags)) {
            return None;
        }
        let mut set = std::collections::BTreeMap::new();
        let mut removed = std::collections::BTreeSet::new();
        let mut host_differs = false;
        for (tags, on_host) in std::iter::once((&m.tags, false)).chain(host.map(|h| (&h.tags, true))) {
            let have = user_tags(tags);
            let mut differs = false;
            for (k, v) in want {
                if have.get(k) != Some(v) {
                    set.insert(k.clone(), v.clone());
                    differs = true;
                }
            }
            for k in have.keys().filter(|k| !want.contains_key(*k)) {
                removed.insert(k.clone());
                differs = true;
            }
            host_differs |= on_host && differs;
        }
        if set.is_empty() && removed.is_empty() {
            return None;
        }
        let cause =
            UpdateCause::Tags { set: set.keys().cloned().collect(), removed: removed.iter().cloned().collect() };
        let id = self.add(
            &machine_address(m),
            ActionKind::UpdateTags {
                provider: pool.provider.clone(),
                machine: name.to_string(),
                instance_id: m.instance_id.clone(),
                host_id: host.filter(|_| host_differs).map(|h| h.id.clone()),
                set,
                remove: removed.into_iter().collect(),
            },
            &[],
        );
        Some((id, cause))
    }

    /// A machine whose state is not checked (unreachable, or nothing on it to check) still gets its tags.
    fn tags_only(&mut self, pool: &DesiredPool, m: &'a ActualMachine, addr: String, name: String) {
        let Some((id, cause)) = self.tag_update(pool, m, &name) else { return };
        let mut after = self.machine_after(pool, m.host_id.clone());
        after.instance_id = Some(m.instance_id.clone());
        after.state = Some(m.state);
        let mut before = self.machine_before(m);
        // Only the tags are known to change here.
        (after.labels, after.setup) = (before.labels.clone(), before.setup.clone());
        before.os = after.os;
        before.arch = after.arch;
        let (before, after) = (Attrs::from(before), Attrs::from(after));
        let subject = Subject::machine(addr, name, Some(&pool.name));
        self.changes.push(ResourceChange::update(subject, vec![cause], before, after, Vec::new(), vec![id]));
    }

    /// The removal (or replacement) of a busy machine waits for its job, and so do everything after it: the
    /// deregistration, the terminate and its host's release. The machine and its host stay as they are.
    pub(super) fn hold_for_job(&mut self, m: &'a ActualMachine, addr: &str, what: &str) {
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        self.held_for_jobs.insert(name.clone());
        self.runners_handled.insert(name.clone().into());
        if let Some(r) = self.runner(&name) {
            let a = ActionKind::DeregisterRunner { runner_id: r.id, runner_name: r.name.clone() };
            self.defer_for_job(addr, &name, a, what);
        }
        let t = ActionKind::TerminateInstance {
            provider: m.provider.to_string(),
            machine: name.clone(),
            instance_id: m.instance_id.clone(),
        };
        self.defer_for_job(addr, &name, t, "the machine is terminated after its runner is removed");
        if let Some(h) = m.host_id.as_deref() {
            self.claimed_hosts.insert(h);
        }
    }

    /// The machine's ephemeral runner registered (its state says so) and is gone from the forge: it ran its one
    /// job. The machine must be reimaged before it registers again, unless the pool opted out.
    pub(super) fn ephemeral_job_done(&self, pool: &DesiredPool, m: &ActualMachine) -> bool {
        let Some(r) = &pool.runner else { return false };
        if !r.reimage_after_job || self.runners.is_none() {
            return false;
        }
        let registered_before = matches!(&m.on_machine, OnMachine::Read { state } if state.runner.is_some());
        registered_before && m.name().is_some_and(|n| self.runner(n).is_none())
    }
}

/// The registration of `name`'s runner as the pool declares it.
fn register_runner(pool: &DesiredPool, name: &str, r: &RunnerSpec) -> ActionKind {
    ActionKind::RegisterRunner {
        provider: pool.provider.clone(),
        pool: pool.name.clone(),
        machine: name.to_string(),
        labels: r.labels.clone(),
        mode: r.mode,
    }
}
