//! Pools: which machines stay, which go (scale-down order, moved and removed pools), which are created.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashSet as HashSet;

use super::attrs::Attrs;

use super::reason::{ChangeReason, ReplaceCause};
use super::*;
use crate::core::model::*;

impl<'a> Builder<'a> {
    pub(super) fn run(&mut self) {
        let desired = self.desired;
        let mut pools: Vec<&DesiredPool> = desired.pools.iter().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        // Hosts that kept machines run on are not idle.
        for p in &pools {
            for &m in self.by_pool.get(p.name.as_str()).into_iter().flatten() {
                if let Some(h) = m.host_id.as_deref() {
                    self.claimed_hosts.insert(h);
                }
            }
        }
        let wanted: BTreeSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();

        // Destroy orphans first, so the hosts they free are accounted for.
        let orphan_pools: Vec<&str> = self.by_pool.keys().copied().filter(|p| !wanted.contains(p)).collect();
        for pool in orphan_pools {
            let ms = self.by_pool.get(pool).cloned().unwrap_or_default();
            for m in ms {
                self.destroy(m, ChangeReason::PoolRemoved { pool: pool.to_string() });
            }
        }
        for p in pools {
            self.plan_pool(p);
        }
        self.ghost_runners();
        self.idle_hosts();
    }

    pub(super) fn plan_pool(&mut self, pool: &'a DesiredPool) {
        let existing: Vec<&'a ActualMachine> = self.by_pool.get(pool.name.as_str()).cloned().unwrap_or_default();
        let (same_provider, moved): (Vec<_>, Vec<_>) = existing.into_iter().partition(|m| m.provider == pool.provider);
        for m in moved {
            let cause = ChangeReason::PoolMoved {
                pool: pool.name.clone(),
                from: m.provider.to_string(),
                to: pool.provider.clone(),
            };
            self.destroy(m, cause);
        }

        // One name, one machine: of copies of one name, one stays, the others go (drift).
        let same_provider = self.remove_copies(same_provider);
        // Which machines stay: see the order below.
        let mut ranked: Vec<(&'a ActualMachine, Option<Replacement>)> =
            same_provider.into_iter().map(|m| (m, self.replacement_reason(pool, m))).collect();
        let count = pool.count as usize;
        let mut removed = Vec::new();
        if ranked.len() > count {
            let mut order: Vec<usize> = (0..ranked.len()).collect();
            order.sort_by_key(|&i| {
                let (m, repl) = &ranked[i];
                // Idle machines go first; of those, the ones named to go (`remove_first`), then those needing
                // replacement anyway, then those whose hosts can be released now, then the highest indexes.
                (
                    m.name().is_some_and(|n| self.busy(n)),
                    !m.name().is_some_and(|n| self.desired.remove_first.contains(n)),
                    repl.is_none(),
                    !self.host_releasable_now(m.host_id.as_deref()),
                    std::cmp::Reverse(machine_index(m)),
                )
            });
            let drop: HashSet<usize> = order.into_iter().take(ranked.len() - count).collect();
            let mut keep = Vec::new();
            for (i, r) in ranked.into_iter().enumerate() {
                if drop.contains(&i) { removed.push(r.0) } else { keep.push(r) }
            }
            ranked = keep;
        }
        let total = ranked.len() + removed.len();
        for m in removed {
            self.destroy(m, ChangeReason::ScaleDown { pool: pool.name.clone(), from: total, to: pool.count });
        }
        let mut used: BTreeSet<u32> = ranked.iter().filter_map(|(m, _)| machine_index(m)).collect();
        // Unusable machines of this pool exist: they count, and their names stay theirs.
        let held: BTreeSet<u32> = self.occupied.get(&pool.name).cloned().unwrap_or_default();
        let held_only = held.difference(&used).count();
        used.extend(held);
        // Other fleets' machines of a pool of the same name keep their names, and do not count here.
        used.extend(self.reserved.get(&pool.name).cloned().unwrap_or_default());
        for (m, repl) in ranked.iter().cloned() {
            match repl {
                Some(causes) => self.replace(pool, m, causes),
                None => self.converge(pool, m),
            }
        }
        let mut missing = count.saturating_sub(ranked.len() + held_only);
        // Another fleet file of the tenant has machines in a pool of this name: it may be this very fleet under
        // another id (a moved file, a checkout without git), so nothing is created here (a Mac host costs a day);
        // the plan's warning says how to settle it.
        if missing > 0 && self.reserved.get(&pool.name).is_some_and(|r| !r.is_empty()) {
            missing = 0;
        }
        let mut next = 0u32;
        for _ in 0..missing {
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            self.create(pool, next, ChangeReason::PoolWants { pool: pool.name.clone(), count: pool.count });
        }
    }

    /// Keeps one instance per machine name and removes the other copies; returns the machines that stay.
    ///
    /// The one that stays is the one whose runner the forge has registered (by the runner id its state recorded),
    /// else one that recorded a registration, else the oldest. A copy's removal never deregisters the runner of
    /// its name (it is the kept machine's); it waits for a running job when the job may be the copy's; its host is
    /// released only when the copy was the host's only instance, by the usual window rules.
    pub(super) fn remove_copies(&mut self, machines: Vec<&'a ActualMachine>) -> Vec<&'a ActualMachine> {
        // The common case: no two machines share a name (one pass over a pool, no map).
        let mut seen: HashSet<&str> = HashSet::with_capacity_and_hasher(machines.len(), Default::default());
        if machines.iter().filter_map(|m| m.name()).all(|n| seen.insert(n)) {
            return machines;
        }
        let mut by_name: BTreeMap<&str, Vec<&'a ActualMachine>> = BTreeMap::new();
        let mut out = Vec::new();
        for m in machines {
            match m.name() {
                Some(n) => by_name.entry(n).or_default().push(m),
                None => out.push(m),
            }
        }
        for (name, mut copies) in by_name {
            if copies.len() == 1 {
                out.extend(copies);
                continue;
            }
            let runner = self.runner(name);
            let recorded_id = |m: &ActualMachine| match &m.on_machine {
                OnMachine::Read { state } => state.runner.as_ref().map(|r| r.runner_id),
                _ => None,
            };
            // Best first: the registered runner's machine, then one that registered, then the oldest.
            copies.sort_by_key(|m| {
                let rec = recorded_id(m);
                (
                    !(runner.is_some() && rec.flatten().is_some() && rec.flatten() == runner.map(|r| r.id)),
                    rec.is_none(),
                    m.launched_at,
                    m.instance_id.clone(),
                )
            });
            let kept = copies.remove(0);
            let by_id = runner.is_some() && recorded_id(kept).flatten() == runner.map(|r| r.id);
            let why_kept = if by_id {
                "its runner is the one registered"
            } else if recorded_id(kept).is_some() {
                "it registered a runner"
            } else {
                "it is the oldest"
            };
            for m in copies {
                let cause = ChangeReason::Copy {
                    name: name.to_string(),
                    kept: kept.instance_id.clone(),
                    why_kept: why_kept.to_string(),
                };
                self.destroy_copy(m, kept, by_id, cause);
            }
            out.push(kept);
        }
        out.sort_by_cached_key(|m| {
            let m: &'a ActualMachine = m;
            (machine_index(m), m.instance_id.as_str())
        });
        out
    }

    /// Terminates a copy of a machine (see [`Builder::remove_copies`]).
    fn destroy_copy(&mut self, m: &'a ActualMachine, kept: &ActualMachine, job_is_kepts: bool, cause: ChangeReason) {
        let name = m.name().unwrap_or(&m.instance_id).to_string();
        let addr = format!("{}#{}", machine_address(m), m.instance_id);
        let terminate = ActionKind::TerminateInstance {
            provider: m.provider.to_string(),
            machine: name.clone(),
            instance_id: m.instance_id.clone(),
        };
        // The running job may be this copy's: wait for it (unless the user asked to interrupt jobs).
        if !job_is_kepts && self.must_wait_for_job(&name) {
            self.defer_for_job(&addr, &name, terminate, &format!("then this copy is removed ({cause})"));
            self.held_for_jobs.insert(name.clone());
            if let Some(h) = m.host_id.as_deref() {
                self.claimed_hosts.insert(h);
            }
            return;
        }
        let mut ids = vec![self.add(&addr, terminate, &[])];
        let t = ids[0];
        // A new machine of this name (the kept one replaced) is made only once the copy is gone.
        self.teardowns.entry(name.clone()).or_default().push(t);
        let alone_on_host = m.host_id.as_ref().and_then(|h| self.hosts.get(h.as_str())).is_some_and(|h| {
            h.instance_ids.iter().all(|i| i == &m.instance_id) && kept.host_id.as_ref() != Some(&h.id)
        });
        if let (Some(h), true) = (m.host_id.clone(), alone_on_host) {
            self.release_or_defer(&h, &[t], &mut ids);
        }
        let subject = Subject::machine(addr, name, m.pool());
        self.changes.push(ResourceChange::delete(subject, cause, Attrs::from(self.machine_before(m)), ids));
    }

    /// Why a kept machine must be replaced.
    pub(super) fn replacement_reason(&self, pool: &DesiredPool, m: &ActualMachine) -> Option<Replacement> {
        let s = &pool.spec;
        let mut why = Vec::new();
        if m.image != s.image {
            why.push(ReplaceCause::Image { from: m.image.to_string(), to: s.image.clone() });
        }
        if s.instance_type.is_some() && m.instance_type.as_deref() != s.instance_type.as_deref() {
            why.push(ReplaceCause::InstanceType {
                from: m.instance_type.as_deref().map(str::to_string),
                to: s.instance_type.clone(),
            });
        }
        if s.availability_zone.is_some() && !s.allows_zone(m.availability_zone.as_deref()) {
            why.push(ReplaceCause::AvailabilityZone {
                from: m.availability_zone.as_deref().map(str::to_string),
                to: s.availability_zone.clone(),
            });
        }
        if matches!(m.state, InstanceState::Stopped | InstanceState::Stopping) {
            why.push(ReplaceCause::Stopped);
        }
        // An ephemeral runner's job is over and the provider cannot reimage this machine in place: a fresh one.
        if self.ephemeral_job_done(pool, m)
            && !self.desired.providers[&pool.provider].reimages_in_place(pool.spec.instance_type.as_deref())
        {
            why.push(ReplaceCause::JobDone);
        }
        // Unreachable for longer than the grace period, and no sign of life from its runner either.
        let grace = pool.runner.as_ref().map(|r| r.offline_grace).unwrap_or(DEFAULT_OFFLINE_GRACE);
        if let (OnMachine::Unreachable { .. }, Some(since)) = (&m.on_machine, m.unreachable_since)
            && since + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX) <= self.now
            && !m.name().and_then(|n| self.runner(n)).is_some_and(|r| r.online)
        {
            why.push(ReplaceCause::Unreachable { since });
        }
        if why.is_empty() { None } else { Some(why) }
    }
}
